"""Tokenizer workers leave SIGTERM and SIGINT to their parent (``ingest/lifecycle.py``).

A group SIGTERM (Slurm, ``kill -- -PGID``) reaches the ingest's parent and its workers at once.
A worker that died of it between the two writes of a large reply (its length, then its bytes)
left the parent's pool reading the missing bytes forever, and the parent never exited (a CI run
of ``tests/cli/test_cli_interrupt.py`` hung so). The workers now ignore both signals and the
parent, which gets the same signal, shuts them down.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers and /proc")


def test_workers_survive_signals_mid_reply_and_stop_with_the_pool(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import os, random, signal, time
        from pathlib import Path
        from sclstore.ingest.embed import start_workers
        from sclstore.ingest.lifecycle import signals_as_exceptions

        def children():
            me, out = os.getpid(), []
            for e in Path("/proc").iterdir():
                try:
                    stat = (e / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, ValueError):
                    continue
                if e.name.isdigit() and int(stat[1]) == me and stat[0] != "Z":
                    out.append(int(e.name))
            return out

        with signals_as_exceptions():  # the CLI's handlers, which a forked worker inherits
            pool = start_workers(2)
            workers = children()
            assert len(workers) == 2, workers
            futs = [pool.submit(bytes, 40_000 + i) for i in range(3000)]  # replies > 16 KiB: two writes each
            rng = random.Random(0)
            sent = 0
            while not all(f.done() for f in futs[:2000]):
                os.kill(rng.choice(workers), rng.choice([signal.SIGTERM, signal.SIGINT]))
                sent += 1
                time.sleep(rng.uniform(0, 0.002))
            assert [len(f.result(timeout=60)) for f in futs] == [40_000 + i for i in range(3000)]
            assert sorted(children()) == sorted(workers)  # none died
            pool.shutdown(wait=True)
            assert children() == []
        print("ok", sent)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
    assert int(out.stdout.split()[1]) >= 20  # the signals did land while the replies were written
