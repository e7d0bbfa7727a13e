"""Time to first frame of a cold pipe, as a user's script gets it: a fresh Python process
builds gen -> plus-one -> sink with the default settings (``func=`` workers, the default start
method), starts it and waits for the sink's first frame; repeated in new processes.

Run ``python benchmarks/first_frame.py [--runs 9] [--start-method forkserver|spawn] [--entry]``.
``--entry`` builds the same pipe from ``entry=`` scripts (written to a temporary directory; each
worker is ``python script``). Prints the median and range; saves JSON to
``benchmarks/results/first_frame.json``. Target (from the Processor/Pipe issue, informative):
first frame <= 0.3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_S = 0.3


async def gen(proc: Any) -> None:
    await proc.emit_sync((41).to_bytes(8, "little"))


async def plus_one(proc: Any) -> None:
    async for data in proc:
        await proc.emit_sync((int.from_bytes(data, "little") + 1).to_bytes(8, "little"))


async def sink(proc: Any) -> None:
    async for data in proc:
        if int.from_bytes(data, "little") != 42:
            raise AssertionError(f"the sink got {data!r}, not 42")
        with open(proc.config["report"], "w") as f:
            json.dump({"t_first_ns": time.monotonic_ns()}, f)


# The same three stages as entry= scripts: each joins by itself, then runs the body above.
ENTRY_SCRIPT = """import asyncio
import json
import time

from upipe import Processor


{body}


async def main() -> None:
    proc = Processor({name!r})
    await proc.join()
    await {func}(proc)


if __name__ == "__main__":
    asyncio.run(main())
"""


def write_entry_scripts(tmp: str) -> dict[str, str]:
    import inspect

    paths = {}
    for name, fn in (("gen", gen), ("plus-one", plus_one), ("sink", sink)):
        body = inspect.getsource(fn).replace("proc: Any", "proc")
        paths[name] = os.path.join(tmp, f"{fn.__name__}.py")
        with open(paths[name], "w") as f:
            f.write(ENTRY_SCRIPT.format(body=body, name=name, func=fn.__name__))
    return paths


async def one_run(method: str | None, report: str, entry_dir: str | None = None
                  ) -> dict[str, float]:
    from upipe import Pipe, Processor  # imported before the clock starts

    scripts = write_entry_scripts(entry_dir) if entry_dir else None
    t0 = time.monotonic_ns()
    pipe = Pipe("first-frame") if method is None else Pipe("first-frame", start_method=method)
    if scripts:
        pipe.add(Processor("gen", entry=scripts["gen"])).add(
            Processor("plus-one", entry=scripts["plus-one"])).add(
            Processor("sink", entry=scripts["sink"], config={"report": report}))
    else:
        pipe.add(Processor("gen", func=gen)).add(Processor("plus-one", func=plus_one)).add(
            Processor("sink", func=sink, config={"report": report}))
    await pipe.start()
    await pipe.wait_for_completion()
    with open(report) as f:
        t_first = json.load(f)["t_first_ns"]
    return {"first_frame_s": (t_first - t0) / 1e9, "done_s": (time.monotonic_ns() - t0) / 1e9}


def child(method: str | None, report: str, entry: bool) -> None:
    if entry:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(asyncio.run(one_run(method, report, tmp))), flush=True)
    else:
        print(json.dumps(asyncio.run(one_run(method, report))), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--start-method", choices=["forkserver", "spawn"], default=None,
                    help="default: upipe's default")
    ap.add_argument("--entry", action="store_true",
                    help="entry= script processors instead of func= (start method unused)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "first_frame.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.start_method, args.child, args.entry)
        return 0
    runs = []
    for i in range(args.runs):
        report = f"/tmp/upipe-first-frame-{os.getpid()}-{i}.json"
        cmd = [sys.executable, __file__, "--child", report]
        if args.start_method:
            cmd += ["--start-method", args.start_method]
        if args.entry:
            cmd.append("--entry")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        except subprocess.CalledProcessError as exc:
            print(exc.stdout, exc.stderr, file=sys.stderr)
            return 1
        finally:
            if os.path.exists(report):
                os.unlink(report)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    firsts = [r["first_frame_s"] for r in runs]
    median = statistics.median(firsts)
    method = "entry" if args.entry else args.start_method or "default"
    kind = "entry= scripts" if args.entry else f"func=, start method {method}"
    print(f"time to first frame, cold 3-stage pipe ({kind}), "
          f"{len(runs)} fresh processes: median {median:.3f} s, range {min(firsts):.3f}-"
          f"{max(firsts):.3f} s; target <= {TARGET_S} s: "
          f"{'met' if median <= TARGET_S else 'NOT met'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"start_method": method, "entry": args.entry, "runs": runs,
                   "median_first_frame_s": median,
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
