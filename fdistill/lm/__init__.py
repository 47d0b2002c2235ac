"""f-divergence alignment of causal language models: f-DPO, TDPO, f-DPG and DPH-RL.

The losses are pure tensor functions (``fdistill.lm.losses``); trainers, the toy language and the demo are
imported lazily so that ``import fdistill.lm`` costs only torch. Divergences come from
``fdistill.divergences`` (LM convention: ``get_divergence(name).dual()``, argument log(pi / pi_ref)).
"""

from fdistill.lm.losses import (FDPGOutput, FDPOOutput, LogZEstimator, MovingAverageBaseline, TDPOOutput,
                                dph_penalty, f_dpo_loss, fdpg_loss, grpo_advantages, grpo_loss,
                                importance_log_z, ppo_clip_loss, sequence_kl, tdpo_loss, token_logps)

__all__ = [
    "f_dpo_loss", "tdpo_loss", "fdpg_loss", "dph_penalty", "ppo_clip_loss", "grpo_advantages", "grpo_loss",
    "sequence_kl", "token_logps", "MovingAverageBaseline", "LogZEstimator", "importance_log_z",
    "FDPOOutput", "TDPOOutput", "FDPGOutput",
]
