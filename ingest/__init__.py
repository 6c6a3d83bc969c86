"""sclstore subpackage."""

import os as _os

# Bit-identical runs whatever the thread count: MKL's GEMM (torch's CPU matmul) otherwise sums in an
# order that depends on the number of threads (1 and 2 threads differ in the last bits), so a run
# embedded by workers with one thread each would differ from a single-process ingest with two.
# Strict conditional numerical reproducibility makes it independent of the thread count at about the
# same speed; MKL reads it when it starts, so it is set on import, before any model runs. A
# user's own MKL_CBWR wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
