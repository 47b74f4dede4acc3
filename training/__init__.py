"""Training: data preparation (training.data), pretraining (training.pretrain), SFT (training.sft),
sharing one loop (training.trainer), checkpointing and distributed setup."""
