"""The suite's model shapes and names: plain constants (no JAX), shared by every face,
by the PyTorch process and by the report."""

MLP_SIZES = (512, 1024, 1024, 1024, 10)
DISC_IN = (32, 32, 3)  # one example: height, width, channels
DISC_CHANNELS = (64, 128, 256)  # 3x3, stride 2, SAME, leaky ReLU 0.2, then dense 1
# HiFi-GAN-shaped generator: conv_pre 80 -> 128 (k7), then per stage a leaky
# ReLU, a ConvTranspose (channels, kernel, stride) and one residual block of
# dilated 3-tap convs (dilations 1, 3, 5, each followed by a 3-tap conv), then
# conv_post -> 1 (k7) and tanh. 32 frames x 256 = 8192 samples.
GEN_IN, GEN_CHANNELS, GEN_FRAMES = 80, 128, 32
GEN_UPS = ((64, 16, 8), (32, 16, 8), (16, 4, 2), (8, 4, 2))
GEN_DILATIONS = (1, 3, 5)
LR = 1e-4

# model key -> (architecture, batch)
MODELS = {
  "mlp128": ("mlp", 128),
  "mlp1024": ("mlp", 1024),
  "disc": ("disc", 64),
  "gen": ("gen", 4),
}
TITLES = {
  "mlp128": "MLP 512-1024-1024-1024-10, batch 128",
  "mlp1024": "MLP, batch 1024",
  "disc": "conv discriminator 32x32x3 -> 64 -> 128 -> 256 -> 1, batch 64",
  "gen": "HiFi-GAN-shaped generator, 4 x 32 frames -> 8192 samples",
}
