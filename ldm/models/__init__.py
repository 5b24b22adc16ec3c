"""The networks, written to read like the architecture: layers, attention, U-Net, autoencoder."""
