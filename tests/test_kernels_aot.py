"""Every Triton kernel, with the tile configuration its launcher picks on a GPU, compiles for
sm_90 (H100) without a GPU, fits its shared memory and the forward passes do not spill.

The compilation runs in a subprocess without TRITON_INTERPRET (under the interpreter the
kernels are interpreter objects, not compilable JIT functions): ``python
tests/test_kernels_aot.py`` prints one JSON line per kernel configuration.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

if __name__ != "__main__":
    pytest.importorskip("triton")

CUDA = torch.device("cuda")
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KiB)
F32, I64 = "*fp32", "*i64"


def _compile(kernel, signature, constexprs, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    spills = None
    if os.path.exists(ptxas):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
        os.unlink(f.name)
        m = re.search(r"(\d+) bytes spill stores", res.stderr)
        spills = int(m.group(1)) if m else None
    return k.metadata.shared, spills


LSE_SIG = {"Z": F32, "POS": F32, "RC": I64, "CC": I64, "M_OUT": F32, "L_OUT": F32, "R": "i32",
           "HALF": "i32", "L": "i32", "stride_z": "i32", "cols_per_split": "i32", "scale": "fp32",
           "ROW_OFF": "i32", "N_LOC": "i32"}
LSE_BWD_SIG = {"Z": F32, "LSE": F32, "G": F32, "RC": I64, "CC": I64, "DZ": F32, "R": "i32",
               "HALF": "i32", "GRAD_ROWS": "i32", "L": "i32", "stride_z": "i32",
               "cols_per_split": "i32", "scale": "fp32", "inv_tau": "fp32",
               "ROW_OFF": "i32", "N_LOC": "i32"}
SIM_FLAGS = ("HAS_MX", "MX_IDS", "HAS_MY", "MY_IDS", "NORMALIZE")
HAM_SIG = {"Q": I64, "X": I64, "MSK": I64, "NQ": "i32", "NX": "i32", "W": "i32",
           "stride_q": "i32", "stride_x": "i32", "stride_m": "i32"}
# the configurations the benchmarks and typical codes hit (each compile costs seconds)
CASES = ["lse-fwd-64", "lse-bwd-64", "lse-fwd-256", "lse-bwd-256", "sim-fwd-64", "sim-bwd-256",
         "ham-dist", "topk-10", "topk-100"]
NO_SPILL = {"lse-fwd-64", "lse-fwd-256", "sim-fwd-64", "ham-dist", "topk-10", "topk-100"}


def _case(name):
    """(kernel, signature, constexprs, num_warps) exactly as the launchers pick them on a GPU."""
    from fasthash.ops import _triton_common as tc
    from fasthash.ops import contrastive_triton as ct
    from fasthash.ops import hamming_topk_triton as ht
    from fasthash.ops import masked_similarity_triton as mt

    kind, *rest = name.split("-")
    arg = int(rest[-1]) if rest and rest[-1].isdigit() else None
    if kind == "lse":
        bl, br, bc, warps = ct._blocks(arg, CUDA, None, None)
        c = {"HAS_CL": True, "BLOCK_R": br, "BLOCK_C": bc, "BLOCK_L": bl, "DOT_PRECISION": "tf32"}
        if rest[0] == "fwd":
            c["FIXED_SHIFT"] = True
            return ct._contrastive_lse_fwd_kernel, {**LSE_SIG, **dict.fromkeys(c, "constexpr")}, \
                c, warps
        return ct._contrastive_lse_bwd_kernel, {**LSE_BWD_SIG, **dict.fromkeys(c, "constexpr")}, \
            c, warps
    if kind == "sim":
        flags = dict.fromkeys(SIM_FLAGS, True)
        if rest[0] == "fwd":
            bn, bm, bl, warps = mt._fwd_config(CUDA)
            c = {**flags, "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_L": min(bl, tc.next_pow2(arg)),
                 "DOT_PRECISION": "tf32"}
            sig = {"X": "*bf16", "Y": "*bf16", "MXT": F32, "MXI": I64, "MYT": F32, "MYI": I64,
                   "OUT": F32, "N": "i32", "M": "i32", "L": "i32", "stride_x": "i32",
                   "stride_y": "i32", "stride_mx": "i32", "stride_my": "i32", "stride_o": "i32"}
            return mt._masked_similarity_fwd_kernel, {**sig, **dict.fromkeys(c, "constexpr")}, \
                c, warps
        bl = tc.next_pow2(arg)
        bn, bm, warps = mt._bwd_config(bl, CUDA)
        c = {**flags, "BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_L": bl, "DOT_PRECISION": "tf32"}
        sig = {"GRAD": F32, "X": F32, "Y": F32, "MXT": F32, "MXI": I64, "MYT": F32, "MYI": I64,
               "DX": F32, "N": "i32", "M": "i32", "L": "i32", "stride_gn": "i32",
               "stride_gm": "i32", "stride_x": "i32", "stride_y": "i32", "stride_mx": "i32",
               "stride_my": "i32"}
        return mt._masked_similarity_bwd_kernel, {**sig, **dict.fromkeys(c, "constexpr")}, c, \
            warps
    if kind == "ham":
        bq, bn, warps = ht._dist_config(CUDA)
        c = {"MASK_MODE": 2, "HW_POPC": True, "BLOCK_Q": bq, "BLOCK_N": bn}
        sig = {**HAM_SIG, "OUT": "*i32", "stride_o": "i32", **dict.fromkeys(c, "constexpr")}
        return ht._hamming_distance_fwd_kernel, sig, c, warps
    kp = tc.next_pow2(arg)
    bq, bn, warps = ht._topk_config(kp, CUDA)
    c = {"MASK_MODE": 1, "HW_POPC": True, "USE_SORT": True, "BLOCK_Q": bq, "BLOCK_N": bn,
         "KP": kp}
    sig = {**HAM_SIG, "KEYS": I64, "n_per_split": "i32", "n_split": "i32",
           **dict.fromkeys(c, "constexpr")}
    return ht._hamming_topk_fwd_kernel, sig, c, warps


def _one(name):
    try:
        shared, spills = _compile(*_case(name))
        return json.dumps({"case": name, "shared": shared, "spills": spills})
    except Exception as e:  # noqa: BLE001 - reported per case to the test
        return json.dumps({"case": name, "error": repr(e)[:2000]})


def _main():
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for line in pool.map(_one, CASES):
            print(line, flush=True)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    rows = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["case"]] = row
    if not rows:
        pytest.fail(f"AOT compile script produced nothing:\n{res.stderr[-3000:]}")
    return rows


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_sm90(report, case):
    row = report[case]
    if "error" in row and "ptxas" in row["error"] and "No such file" in row["error"]:
        pytest.skip("no ptxas in this triton install")
    assert "error" not in row, row.get("error")
    assert row["shared"] <= SMEM_LIMIT, f"{row['shared']} bytes of shared memory"
    if case in NO_SPILL:
        assert row["spills"] in (0, None), f"{row['spills']} bytes of register spills"


if __name__ == "__main__":
    _main()
