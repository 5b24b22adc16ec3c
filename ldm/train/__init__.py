"""Training on accelerate: stage 1 (KL autoencoder), stage 2 (text-conditioned U-Net), fine-tuning
(full or LoRA), with atomic checkpoints and exact resume. See docs/TRAINING.md.

Entry points: `ldm.train.runner.train(cfg, output_dir, resume)`, `ldm.train.config.load_config`,
`ldm.train.commands.register` (the CLI). Generation never imports this package: merging a LoRA
for generation is `ldm.io.lora.apply_lora`.
Nothing is imported here, so `import ldm.train.config` loads without accelerate's start-up cost.
"""
