"""DPO of the SFT-tuned tiny decoder on preference pairs made from Dolly's open_qa records.

Tune (configs/sft/dolly_tiny.py), write the pairs, then tune on preferences from the SFT workdir:

  python experiments/preference/dolly_pairs.py ../shared/data/instruct/dolly15k_open_qa.jsonl \\
      runs/dolly_pairs.jsonl
  python -m fmjax.main --config configs/preference/dolly_tiny.py --workdir runs/dpo \\
      --config.init_from=runs/sft

The pairs prefer each answer over the same words shuffled. Both the policy and the
frozen reference start from init_from (fmjax/tasks/preference.py); eval reports reward accuracy
and margins on held-out pairs. task.loss=ipo for IPO; task.label_smoothing > 0 for conservative DPO.
"""
from configs.sft import dolly_tiny as sft_tiny


def get_config():
    c = sft_tiny.get_config()
    c.init_from = ""  # e.g. runs/sft: a workdir of configs/sft/dolly_tiny.py

    c.task.name = "preference"
    c.task.loss = "dpo"  # dpo | ipo
    c.task.beta = 0.1
    c.task.label_smoothing = 0.0  # > 0: conservative DPO
    del c.task["z_loss"]

    c.data.path = "runs/dolly_pairs.jsonl"
    c.data.seq_len = 192

    c.optim.lr = 1e-4
    c.optim.clip_norm = 1.0
    c.train.steps = 200
    c.train.batch_size = 16
    c.train.eval_every = 50
    c.train.ckpt_every = 50
    return c
