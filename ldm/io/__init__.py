"""Reading and writing: weights files, diffusers folders, single files, LoRA files, PNG infotext."""
