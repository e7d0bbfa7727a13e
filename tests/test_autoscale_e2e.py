"""The autoscaler on a live pipe: a slow stage gets more instances, and fewer when idle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pipe_workers as pw
import pytest

from upipe import Pipe, Processor


@pytest.mark.timeout(120)
def test_a_slow_stage_gets_more_instances_then_fewer(tmp_path: Path, no_leaks: None) -> None:
    report = str(tmp_path / "r")
    n = 3000

    async def main() -> tuple[list[int], list[str], dict[str, int]]:
        async with Pipe("autoscaled") as pipe:
            pipe.add(Processor("src", func=pw.burst_then_idle,
                               config={"count": n, "idle": 30})).add(
                Processor("mid", func=pw.slow_plus_one, config={"delay": 0.005},
                          autoscale=6)).add(
                Processor("sink", func=pw.collect, config={"report": report}))
            await pipe.start()
            counts: list[int] = []
            reasons: list[str] = []
            grew = shrank = False
            for _ in range(900):  # 90 s at most; the pipe ends sooner
                await asyncio.sleep(0.1)
                mid = pipe.snapshot()["processors"]["mid"]
                counts.append(mid["instances"])
                if not reasons or reasons[-1] != mid["reason"]:
                    reasons.append(mid["reason"])
                grew = grew or mid["instances"] >= 3
                if grew and mid["frames_in"] >= n and mid["instances"] == 1:
                    shrank = True
                    break
            assert grew and shrank, (counts[::10], reasons)
            lost = pipe.statistics().processors["mid"]["lost_frames"]
            await pipe.terminate()
            await pipe.wait_for_completion()
        return counts, reasons, {"lost": lost}

    counts, reasons, extra = asyncio.run(main())
    assert max(counts) <= 6 and min(counts) >= 1
    assert any("+" in r and "busy" in r for r in reasons), reasons  # the scale-up, with numbers
    assert extra["lost"] == 0
    seen = [x for r in pw.read_reports(report + ".sink") for x in r["seen"]]
    assert sorted(seen) == list(range(1, n + 1)), "every frame once, through every scaling"
