"""Under the real `deepspeed` launcher, 2 CPU processes, FRM with ep_size=2 (three experts per rank)."""
import json

import pytest

from launcher import ROOT, run_deepspeed


@pytest.mark.slow
def test_expert_parallel_equals_single_process_and_trains(tmp_path):
    run_deepspeed(ROOT / "tests/scripts/ep_equivalence.py", ["--out", str(tmp_path)], nprocs=2, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2
        assert r["local_frm_expert_params"] == 3 * 4      # 3 of the 6 experts live on each rank
        assert r["init_equal"]                             # ep_size=2 built exactly the ep_size=1 experts
        assert r["max_diff"] <= 1e-5                       # same output as the single-process model
        losses = r["losses"]
        assert len(losses) == 10 and losses[-1] < losses[0] * 0.9
