"""``make fuzz``: the property suites at ~10^5 examples plus the atheris target on fasthash._C,
bounded by time; prints ONE summary line.

    python fuzz/run.py                 # FUZZ_SECONDS (default 600) in total
    FUZZ_SECONDS=60 FUZZ_EXAMPLES=5000 python fuzz/run.py   # a short run

Phases (each in a subprocess, so a crash is counted instead of ending the run):

1. properties: ``tests/test_properties*.py`` under the hypothesis profile "fuzz" with
   FUZZ_EXAMPLES examples in total (default 100000, split evenly over the property tests),
   within FUZZ_PROPERTY_SHARE (default 0.75) of the time. A test stops early when its share of
   the remaining time is used up (its examples so far still count). Inputs are counted exactly:
   every executed test case (generation and shrinking), through hypothesis' ``inner_test``.
2. atheris: ``fuzz/fuzz_bindings.py`` (the search bindings and the MIH tables) for the rest
   of the time, restarted after a crash or a hang. With clang++ the extension is rebuilt
   (build/fuzz, via fuzz/build_ext.py) with libFuzzer coverage instrumentation so the C++ code
   guides the fuzzer; without clang the in-place extension is fuzzed with Python-level
   feedback (the harness's decoding and checks) only.

Counted: inputs (property examples + atheris executions), crashes (a dead process: signal,
sanitizer, uncaught exception in the harness), wrong answers (failed properties, and atheris
inputs whose answer or accept/reject verdict differs from the oracle), hangs (one input running
longer than FUZZ_HANG_SECONDS, default 20). Details go to build/fuzz/report.md; artifacts
(crash-*/timeout-* inputs, wrong.jsonl) to build/fuzz/. Exit status 0 only when all are 0.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "fuzz"
HANG_EXIT = 86  # the properties child's exit status after its watchdog saw a hang
COVERAGE_FLAGS = "-fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp -O1 -g"


def log(msg: str) -> None:
    print(f"[fuzz] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- properties child


class _PropertyPlugin:
    """In-process pytest plugin of the properties child. It wraps each hypothesis test's
    ``inner_test`` (the hook hypothesis offers plugins) to count executed test cases, to stop a
    test when its share of the remaining time is used, and to time every single input for the
    hang watchdog."""

    def __init__(self, deadline: float, hang_s: float, stats: Path):
        self.deadline = deadline
        self.hang_s = hang_s
        self.stats = stats
        self.counts: dict[str, int] = {}
        self.failed: set[str] = set()
        self.current: str | None = None
        self.call_started: float | None = None  # start of the input being run, if any
        self.remaining = 0

    def _write(self, record: dict) -> None:
        with open(self.stats, "a") as f:
            f.write(json.dumps(record) + "\n")

    def watchdog(self) -> None:
        while True:
            time.sleep(0.5)
            started = self.call_started
            if started is not None and time.monotonic() - started > self.hang_s:
                self._write({"hang": self.current, "inputs": self.counts.get(self.current, 0)})
                log(f"hang: {self.current} ran one input for > {self.hang_s:.0f}s; traceback:")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                os._exit(HANG_EXIT)

    def pytest_collection_modifyitems(self, items) -> None:
        self.remaining = len(items)

    def pytest_runtest_setup(self, item) -> None:
        self.current = item.nodeid
        handle = getattr(item.obj, "hypothesis", None)
        if handle is None:
            return
        now = time.monotonic()
        slice_end = now + max(0.0, self.deadline - now) / max(1, self.remaining)
        inner = handle.inner_test
        node = item.nodeid

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            # stop generating once the slice is used, unless this test already failed (then
            # hypothesis must be left to shrink and report it)
            if time.monotonic() > slice_end and node not in self.failed:
                import pytest

                pytest.skip("fuzz: time slice used up")
            self.counts[node] = self.counts.get(node, 0) + 1
            self.call_started = time.monotonic()
            try:
                return inner(*args, **kwargs)
            except BaseException as exc:
                if type(exc).__name__ == "UnsatisfiedAssumption":  # assume(): not a test case
                    self.counts[node] -= 1
                elif type(exc).__name__ != "Skipped":
                    self.failed.add(node)
                raise
            finally:
                self.call_started = None

        handle.inner_test = timed
        item._fuzz_restore = (handle, inner)

    def pytest_runtest_teardown(self, item) -> None:
        restore = getattr(item, "_fuzz_restore", None)
        if restore is not None:
            restore[0].inner_test = restore[1]

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            skipped_for_time = report.skipped and "time slice" in str(report.longrepr)
            self._write({
                "test": report.nodeid,
                "outcome": "passed" if skipped_for_time else report.outcome,
                "stopped_for_time": bool(skipped_for_time),
                "inputs": self.counts.get(report.nodeid, 0),
                "failure": str(report.longrepr)[-6000:] if report.failed else None,
                "seconds": round(report.duration, 2),
            })
            self.remaining -= 1
            self.current = None


def properties_child(args) -> int:
    import pytest

    plugin = _PropertyPlugin(time.monotonic() + args.budget, args.hang_seconds, Path(args.stats))
    threading.Thread(target=plugin.watchdog, daemon=True).start()
    pytest_args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", *args.pytest_args]
    return pytest.main(pytest_args, plugins=[plugin])


def run_properties(budget: float, examples: int, hang_s: float, report: list[str]) -> dict:
    """Run the property suites in children (restarted after a crash/hang); return counts."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_properties*.py"))
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True)
    tests = [ln.strip() for ln in collect.stdout.splitlines() if "::" in ln]
    res = {"inputs": 0, "crashes": 0, "wrong": 0, "hangs": 0, "tests": len(tests)}
    if not tests:
        report.append(f"properties: could not collect tests\n```\n{collect.stdout[-3000:]}"
                      f"{collect.stderr[-3000:]}\n```")
        res["crashes"] += 1
        return res
    # 5 % more than an even split: a few costly properties run a fraction of it (@heavy)
    per_test = max(1, math.ceil(1.05 * examples / len(tests)))
    stats = OUT / "properties.jsonl"
    stats.unlink(missing_ok=True)
    env = dict(os.environ, HYPOTHESIS_PROFILE="fuzz", FUZZ_EXAMPLES_PER_TEST=str(per_test))
    log(f"properties: {len(tests)} tests x {per_test} examples, {budget:.0f}s budget")
    deadline = time.monotonic() + budget
    todo = list(tests)
    done: dict[str, dict] = {}
    while todo and time.monotonic() < deadline - 1:
        left = deadline - time.monotonic()
        cmd = [sys.executable, str(Path(__file__)), "_properties", "--budget", f"{left:.1f}",
               "--hang-seconds", str(hang_s), "--stats", str(stats), "--", *todo]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=left + 10 * hang_s + 120)
        (OUT / "properties.log").write_text(proc.stdout[-200000:] + proc.stderr[-200000:])
        hung = None
        for line in stats.read_text().splitlines() if stats.exists() else []:
            rec = json.loads(line)
            if "hang" in rec:
                hung = rec
            elif rec["test"] not in done:
                done[rec["test"]] = rec
        stats.unlink(missing_ok=True)
        todo = [t for t in todo if t not in done]
        if proc.returncode in (0, 1) and not hung:
            break
        culprit = hung["hang"] if hung else (todo[0] if todo else "?")
        if hung:
            res["hangs"] += 1
            res["inputs"] += hung.get("inputs", 0)
            report.append(f"- HANG in `{culprit}` (one input > {hang_s:.0f}s); traceback in "
                          "build/fuzz/properties.log")
        else:
            res["crashes"] += 1
            report.append(f"- CRASH (exit status {proc.returncode}) while running `{culprit}`; "
                          f"output tail:\n```\n{proc.stderr[-3000:]}\n```")
        todo = [t for t in todo if t != culprit]
    for name, rec in done.items():
        res["inputs"] += rec["inputs"]
        if rec["outcome"] == "failed":
            res["wrong"] += 1
            report.append(f"- WRONG ANSWER: `{name}` failed after {rec['inputs']} inputs:\n"
                          f"```\n{rec['failure']}\n```")
    stopped = sum(1 for r in done.values() if r.get("stopped_for_time"))
    res["not_run"] = len(todo)
    report.append(f"properties: {res['inputs']} inputs over {len(done)} of {len(tests)} tests "
                  f"({per_test} examples each at most; {stopped} stopped by their time slice, "
                  f"{len(todo)} not run)")
    return res


# ----------------------------------------------------------------------------- atheris


def _native_tree(report: list[str]) -> Path | None:
    """Build the coverage-instrumented extension with clang++ (None when impossible)."""
    if os.environ.get("FUZZ_NATIVE", "1") != "1" or shutil.which("clang++") is None:
        report.append("atheris: clang++ not found (apt-get install clang): fuzzing the in-place "
                      "fasthash._C without C++ coverage feedback")
        return None
    cmd = [sys.executable, str(ROOT / "fuzz" / "build_ext.py"), str(OUT), "--cxx", "clang++",
           "--flags", COVERAGE_FLAGS, "--alt-cxx", "g++", "--alt-flags", "-O1 -g",
           "--alt-files", "search_avx2,search_avx512", "--quiet"]
    log("atheris: building the coverage-instrumented fasthash._C (clang++) in build/fuzz")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        report.append(f"atheris: the clang coverage build failed, fuzzing the in-place extension"
                      f"\n```\n{proc.stderr[-2000:]}\n```")
        return None
    return Path(proc.stdout.strip().splitlines()[-1])


def run_atheris(budget: float, hang_s: float, report: list[str]) -> dict:
    res = {"inputs": 0, "crashes": 0, "wrong": 0, "hangs": 0}
    try:
        import atheris  # noqa: F401
    except ImportError:
        report.append("atheris: not installed (pip install -e '.[fuzz]'): phase skipped")
        return res
    t0 = time.monotonic()
    tree = _native_tree(report)
    corpus = OUT / "corpus"
    artifacts = OUT / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    wrong_file = OUT / "wrong.jsonl"
    wrong_file.unlink(missing_ok=True)
    env = dict(os.environ, FUZZ_WRONG_FILE=str(wrong_file))
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    deadline = t0 + budget
    runs = 0
    log_path = OUT / "atheris.log"
    log_path.write_text("")
    while time.monotonic() < deadline - 3:
        left = int(deadline - time.monotonic())
        cmd = [sys.executable, str(ROOT / "fuzz" / "fuzz_bindings.py"), f"-max_total_time={left}",
               f"-timeout={int(hang_s)}", "-rss_limit_mb=4096", "-print_final_stats=1",
               "-max_len=4096", f"-artifact_prefix={artifacts}/", str(corpus)]
        proc = subprocess.run(cmd, cwd=OUT, env=env, capture_output=True, text=True,
                              timeout=left + 4 * hang_s + 60)
        runs += 1
        err = proc.stderr
        with open(log_path, "a") as f:
            f.write(f"==== run {runs}: exit {proc.returncode}\n{err[-100000:]}\n")
        m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", err)
        res["inputs"] += int(m[-1]) if m else 0
        if "fasthash._C from" in err and runs == 1:
            report.append("atheris: " + next(ln for ln in err.splitlines() if "fasthash._C from" in
                                               ln).replace("fuzz_bindings: ", ""))
        if proc.returncode == 0:
            break
        artifact = re.findall(r"Test unit written to (\S+)", err)
        what = "HANG" if "libFuzzer: timeout" in err else "CRASH"
        res["hangs" if what == "HANG" else "crashes"] += 1
        tail = "\n".join(ln for ln in err.splitlines()[-60:] if not ln.startswith("#"))
        report.append(f"- {what} in the atheris target (exit {proc.returncode}); input "
                      f"{artifact[-1] if artifact else '?'}; replay: `PYTHONPATH={tree or ''} "
                      f"python fuzz/fuzz_bindings.py <input>`\n```\n{tail[-4000:]}\n```")
        if runs == 1 and res["inputs"] <= 1 and tree is not None:
            report.append("atheris: the instrumented build did not start; retrying without it")
            env.pop("PYTHONPATH", None)
            tree = None
    wrongs = [json.loads(ln) for ln in wrong_file.read_text().splitlines()] if \
        wrong_file.exists() else []
    res["wrong"] = len(wrongs)
    kinds: dict[str, int] = {}
    for w in wrongs:
        key = w["problem"][:160] + f" [{w['call']['fn']}]"
        kinds[key] = kinds.get(key, 0) + 1
    for key, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        example = next(w for w in wrongs if w["problem"][:160] + f" [{w['call']['fn']}]" == key)
        report.append(f"- WRONG ANSWER x{n} (atheris): {key}\n  e.g. {json.dumps(example)[:1500]}")
    report.append(f"atheris: {res['inputs']} inputs in {runs} run(s), "
                  f"{'C++ coverage-guided' if tree is not None else 'Python-level feedback'}; "
                  f"corpus {corpus}")
    return res


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_properties":
        ap = argparse.ArgumentParser()
        ap.add_argument("--budget", type=float, required=True)
        ap.add_argument("--hang-seconds", type=float, required=True)
        ap.add_argument("--stats", required=True)
        ap.add_argument("pytest_args", nargs="*")
        return properties_child(ap.parse_args(argv[1:]))

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 600)))
    ap.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", 100000)))
    ap.add_argument("--property-share", type=float,
                    default=float(os.environ.get("FUZZ_PROPERTY_SHARE", 0.75)))
    ap.add_argument("--hang-seconds", type=float,
                    default=float(os.environ.get("FUZZ_HANG_SECONDS", 20)))
    ap.add_argument("--skip", choices=["properties", "atheris"], action="append", default=[])
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: list[str] = [f"# make fuzz report ({time.strftime('%Y-%m-%d %H:%M:%S')})", ""]
    total = {"inputs": 0, "crashes": 0, "wrong": 0, "hangs": 0}
    if "properties" not in args.skip:
        budget = args.seconds if "atheris" in args.skip else args.seconds * args.property_share
        p = run_properties(budget, args.examples, args.hang_seconds, report)
        for k in total:
            total[k] += p[k]
    if "atheris" not in args.skip:
        left = args.seconds - (time.monotonic() - t0)
        a = run_atheris(max(10.0, left), args.hang_seconds, report)
        for k in total:
            total[k] += a[k]
    elapsed = time.monotonic() - t0
    line = (f"fuzz: {total['inputs']} inputs, {total['crashes']} crashes, {total['wrong']} wrong "
            f"answers, {total['hangs']} hangs")
    report += ["", line, f"({elapsed:.0f}s)"]
    (OUT / "report.md").write_text("\n".join(report) + "\n")
    log(f"details: {OUT / 'report.md'} ({elapsed:.0f}s)")
    print(line, flush=True)
    return 0 if total["crashes"] == total["wrong"] == total["hangs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
