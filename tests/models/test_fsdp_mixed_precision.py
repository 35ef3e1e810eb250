"""Our models under FSDP2 mixed precision: the parameters keep their float32 storage while the forward runs (and casts
its inputs) in bfloat16, so the input-dtype check must not compare the inputs with the stored parameters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, warnings, torch, torch.distributed as dist
    warnings.filterwarnings("ignore")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from hf_koopman.models.equivcnp import CNPConfig, CNPModel
    from hf_koopman.models.reynet import ReyNetConfig, ReyNetForGraphClassification

    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    reynet = ReyNetForGraphClassification(ReyNetConfig(in_channels=2, channel_hidden_sizes=[4], head_hidden_sizes=[4],
                                                       phi_hidden_sizes=[4], reynolds_channels=4))
    for block in reynet.reynet.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(reynet, mp_policy=policy)
    print("reynet", reynet(torch.rand(2, 2, 5, 5), labels=torch.tensor([0, 1])).logits.dtype)
    cnp = CNPModel(CNPConfig())
    fully_shard(cnp, mp_policy=policy)
    print("cnp", cnp(torch.rand(2, 5, 1), torch.rand(2, 5, 1), torch.rand(2, 3, 1)).mean.dtype)
    dist.destroy_process_group()
    """
)


def test_fsdp2_bf16_forward_runs_with_float32_inputs_cast_by_fsdp(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "rendezvous")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reynet torch.bfloat16" in proc.stdout and "cnp torch.bfloat16" in proc.stdout, proc.stdout
