"""Print, as one line `dapt-test-env {json}`, the variables named on the command line as this rank sees them
(None: unset), with OpenMPI's rank. Started by the deepspeed launcher in tests/test_slurm.py."""
import json
import os
import sys

names = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
seen = {n: os.environ.get(n) for n in names}
seen["OMPI_COMM_WORLD_RANK"] = os.environ.get("OMPI_COMM_WORLD_RANK")
print("dapt-test-env " + json.dumps(seen), flush=True)
