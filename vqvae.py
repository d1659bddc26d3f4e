"""VQ-VAE: the whole model in one file. "Neural Discrete Representation Learning", A. van den Oord,
O. Vinyals, K. Kavukcuoglu, NeurIPS 2017, arXiv:1711.00937; the prior: "Conditional Image Generation with
PixelCNN Decoders", A. van den Oord et al., NeurIPS 2016, arXiv:1606.05328.

An encoder maps x to latents z_e(x); each latent vector is replaced by its nearest entry of a learnt
codebook e (Eq. 1); the decoder reconstructs x from z_q(x) = e_k (Eq. 2); the loss (Eq. 3) trains all three:
    L = log p(x|z_q(x)) + ||sg[z_e(x)] - e||^2 + beta * ||z_e(x) - sg[e]||^2
First the image model, complete: nearest_code, VectorQuantizer (with the EMA codebook of App. A.1),
Encoder/Decoder, VQVAE, GatedPixelCNN (the prior), bits_per_dim; then speech (Sec. 4.3: mu-law, WaveNet,
AudioVQVAE) and video (Sec. 4.4: ActionConditionalPrior). A model is built from one dataclass config, kept
as `.config` ({class name, config, weights} restores it); a prior has `log_prob` (nats) and `sample`.
Tensors are channel-first, (B, C, *spatial) with 1, 2 or 3 spatial dims; the codebook is (K, D) as in
nn.Embedding. All runs in pure PyTorch; where the optional compiled extension vqvae_ext (csrc/) runs on a
tensor (vqvae_ext.supports), the nearest-code search and EMA statistics use its operators, with the same
results. No other file of the project is imported.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: importing it registers torch.ops.vqvae_ext (see csrc/vqvae_ext/__init__.py)
    import vqvae_ext
except ImportError:
    vqvae_ext = None


# ---- Eq. 1: the posterior is a one-hot on the nearest codebook entry ---------------------------------
#     q(z = k | x) = 1 if k = argmin_j ||z_e(x) - e_j||_2, else 0
def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codes (N,) int64: the index of the nearest codebook row to each row of z (Eq. 1), ties to the lowest.

    z: (N, D) floating; codebook: (K, D), same dtype and device. The extension's operator where
    vqvae_ext.supports(z) (not in torch.export), else PyTorch, with the same codes. Raises ValueError on bad shapes or dtypes,
    NonFiniteError (a ValueError) on NaN/Inf in z or the codebook or overflowing squared distances (on a
    GPU or compiled: an asynchronous assert, see _require)."""
    _require(z.dim() == 2 and z.is_floating_point(), "z: expected a floating (N, D) tensor", z)
    _require(codebook.dim() == 2 and codebook.shape[1] == z.shape[1] and codebook.shape[0] > 0
             and codebook.dtype == z.dtype, f"codebook: expected a (K, {z.shape[1]}) {z.dtype} tensor, K > 0", codebook)
    norms = (codebook * codebook).sum(1)                                         # ||e_k||^2, (K,)
    message = "nearest_code: z or codebook contains NaN or Inf (or their squared distances overflow)"
    if _extension_runs(z):
        _require(torch.isfinite(norms).all(), message, error=NonFiniteError)
        codes = torch.ops.vqvae_ext.nearest_code(z.detach(), codebook.detach())
        _require((codes >= 0).all(), message, error=NonFiniteError)          # -1: a row with no finite distance
        return codes
    # ||z - e_k||^2 = ||z||^2 - 2 <z, e_k> + ||e_k||^2, where ||z||^2 is the same for every k
    distances = torch.addmm(norms, z, codebook.t(), alpha=-2)                   # (N, K)
    codes = distances.argmin(1)
    _require(torch.isfinite(norms).all() & torch.isfinite(distances.gather(1, codes[:, None])).all(), message,
             error=NonFiniteError)
    return codes


def _code_statistics(z: torch.Tensor, codes: torch.Tensor, num_embeddings: int):
    """Per-code counts (K,) int64 and sums of z (K, D), without a one-hot (N, K) matrix."""
    if _extension_runs(z):
        return torch.ops.vqvae_ext.ema_stats(z, codes, num_embeddings)
    counts = torch.bincount(codes, minlength=num_embeddings)
    return counts, z.new_zeros(num_embeddings, z.shape[1]).index_add_(0, codes, z)


def _extension_runs(z: torch.Tensor) -> bool:
    """Whether vqvae_ext's operators run for z; never in torch.export, whose programs then run without it."""
    return vqvae_ext is not None and not torch.compiler.is_exporting() and vqvae_ext.supports(z)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


USAGE_DECAY = 0.99  # the paper's EMA decay, also of code usage without the EMA codebook (dead-code restarts)


class VQOutput(NamedTuple):
    z_q: torch.Tensor              # z_e's shape: quantized latents, straight-through gradient to z_e
    codes: torch.Tensor            # (B, *S) int64
    codebook_loss: torch.Tensor    # scalar, ||sg[z_e] - e||^2 (zero with the EMA codebook)
    commitment_loss: torch.Tensor  # scalar, beta * ||z_e - sg[e]||^2
    perplexity: torch.Tensor       # scalar, exp(entropy of code usage in this batch)
    counts: torch.Tensor           # (K,) how often each code was chosen in this batch


class VectorQuantizer(nn.Module):
    """Vector quantization with a straight-through gradient (Sec. 3.1, Eq. 1-3, App. A.1). Example: z_e (16, 64, 8, 8)
    with D = 64 is flattened to (1024, 64) latents, each replaced by the nearest of the K codebook rows: z_q (16, 64,
    8, 8), codes (16, 8, 8). Args: num_embeddings K; embedding_dim D (z_e's channels); commitment_cost: beta of Eq. 3
    (paper: 0.25); decay: if set (paper: 0.99), the codebook is the moving average of App. A.1 (a buffer, no codebook
    loss), else None: the codebook loss of Eq. 3; epsilon: Laplace smoothing of the EMA cluster sizes; channel_last:
    vectors on the last axis, z_e (B, *S, D) as a transformer's tokens, instead of (B, D, *S). Not in the paper, on by
    default: dead_code_threshold, codes whose moving-average use per batch falls below it restart from random latents
    of the batch (None: the paper's quantizer); off by default: kmeans_init, the codebook from k-means on the first
    training batch. The codebook starts at N(0, 1/D) per entry, codes of norm about 1 (Sonnet v2's scale). Its state
    stays in float32 under .to(bfloat16) or .half(). Raises ValueError for arguments out of range."""
    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float | None = None, epsilon: float = 1e-5, kmeans_init: bool = False,
                 dead_code_threshold: float | None = 0.1, channel_last: bool = False):
        super().__init__()
        _check_fields("VectorQuantizer", num_embeddings=num_embeddings, embedding_dim=embedding_dim, epsilon=epsilon,
                      commitment_cost=commitment_cost, decay=decay, dead_code_threshold=dead_code_threshold,
                      kmeans_init=kmeans_init, channel_last=channel_last)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.decay, self.epsilon = commitment_cost, decay, epsilon
        self.kmeans_init, self.dead_code_threshold, self.channel_last = kmeans_init, dead_code_threshold, channel_last
        # Codes of norm about 1, as an untrained encoder's outputs: N(0, 1) codes (norm sqrt(D)) lie so far from
        # them that the few of smallest norm take every latent.
        codebook = torch.randn(num_embeddings, embedding_dim) / math.sqrt(embedding_dim)
        if decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            # As if each code had been chosen once with its own value: m / N = e at step 0. A code never
            # chosen then shrinks towards the origin, e_i = gamma^t e0 / (gamma^t + ~epsilon), once
            # gamma^t nears epsilon (t = ln(epsilon) / ln(gamma), 1,146 steps at 0.99 and 1e-5).
            self.register_buffer("ema_embed_sum", codebook.clone())
        # Moving average of code usage N_i (Eq. 6); also serves dead-code detection.
        self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._initialized = not kmeans_init   # the buffer as a Python bool: torch.compile specializes on it

    def forward(self, z_e: torch.Tensor) -> VQOutput:
        """Quantize z_e (B, D, *S), or (B, *S, D) with channel_last, in float32 whatever the autocast state
        (z_q comes back in z_e's dtype and layout). Raises ValueError for a wrong shape or dtype,
        NonFiniteError for NaN/Inf, and in training for an EMA update that would leave non-finite codes."""
        D, K = self.embedding_dim, self.num_embeddings
        axis, layout = (-1, f"(B, *S, {D})") if self.channel_last else (1, f"(B, {D}, *S)")
        _require(z_e.dim() >= (2 if self.channel_last else 3) and z_e.shape[axis] == D and z_e.is_floating_point()
                 and z_e.numel() > 0, f"z_e: expected a floating {layout} tensor with B > 0", z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float().movedim(axis, -1)                          # (B, *S, D)
            flat = z.reshape(-1, D)                                    # (N, D), N = B * prod(S)
            if self.training and not self._initialized:
                self._kmeans_init(flat.detach())
            codebook = self.codebook.float()
            codes = nearest_code(flat.detach(), codebook.detach())     # Eq. 1, (N,)
            e = F.embedding(codes, codebook)                           # (N, D), e_k
            # Eq. 2, z_q(x) = e_k, with the straight-through estimator: the forward value is e_k,
            # the backward pass copies the gradient at z_q unchanged to z_e.
            z_q = flat + (e - flat).detach()
            # Eq. 3, ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2: the codebook term moves e, the commitment
            # term moves z_e (beta belongs to it alone). Means over latents and D, as the authors' Sonnet
            # code, so that the scale matches a per-pixel mean reconstruction error.
            codebook_loss = F.mse_loss(e, flat.detach()) if self.decay is None else flat.new_zeros(())
            commitment_loss = self.commitment_cost * F.mse_loss(flat, e.detach())
            counts, sums = _code_statistics(flat.detach(), codes, K)
            perplexity = torch.exp(torch.special.entr(counts / counts.sum()).sum())
            if self.training:
                self._update_codebook(counts, sums, flat.detach())
        z_q = z_q.reshape(z.shape).movedim(-1, axis).to(z_e.dtype)     # z_e's layout
        return VQOutput(z_q, codes.reshape(z.shape[:-1]), codebook_loss, commitment_loss, perplexity, counts)

    @torch.no_grad()
    def _update_codebook(self, counts: torch.Tensor, sums: torch.Tensor, flat: torch.Tensor) -> None:
        """App. A.1 (Eq. 6-8) and the dead-code restart, identical on every process. A new EMA codebook with
        a non-finite squared norm, which no search can use, is refused (NonFiniteError, state unchanged)."""
        if _distributed():  # the statistics of the whole global batch, so that codebooks stay equal
            counts, sums = counts.clone(), sums.clone()
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        gamma = USAGE_DECAY if self.decay is None else self.decay
        cluster_size = torch.add(self.ema_cluster_size * gamma, counts, alpha=1 - gamma)  # Eq. 6: N_i
        if self.decay is not None:
            embed_sum = torch.add(self.ema_embed_sum * gamma, sums, alpha=1 - gamma)      # Eq. 7: m_i
            n = cluster_size.sum()
            # Laplace smoothing keeps N_i > 0 for codes that have not been chosen lately.
            smoothed = (cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
            codebook = embed_sum / smoothed[:, None]                                     # Eq. 8: e_i = m_i / N_i
            _require(torch.isfinite((codebook * codebook).sum(1)).all(),
                     "z_e: the EMA codebook update would leave non-finite codes (inputs too large)", error=NonFiniteError)
            self.ema_embed_sum.copy_(embed_sum)
            self.codebook.copy_(codebook)
        self.ema_cluster_size.copy_(cluster_size)
        if self.dead_code_threshold is not None:
            self._restart_dead_codes(flat)

    # ---- Not in the paper: dead-code restarts and k-means initialisation, against codebook collapse ----
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Each code whose moving-average use per batch fell below dead_code_threshold takes a random latent
        of the batch (process 0's), as if chosen once. Branch-free, with one draw per code whether it is dead
        or not, so that torch.compile takes it whole and every process decides alike."""
        if not torch.compiler.is_compiling() and self.dead_code_threshold >= len(flat) / self.num_embeddings:
            warnings.warn(f"VectorQuantizer: dead_code_threshold {self.dead_code_threshold} is not below the mean use of a "
                          f"code per batch (N / K = {len(flat)} / {self.num_embeddings}): even codes in use restart; "
                          "lower it, or quantize larger batches", stacklevel=4)
        dead = self.ema_cluster_size < self.dead_code_threshold                      # (K,), equal on all processes
        self._assign(dead, flat[torch.randint(len(flat), (self.num_embeddings,), device=flat.device)])

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, iterations: int = 10) -> None:
        """Codebook from k-means on the latents flat (N, D) of the first training batch (process 0's). With
        K >= N, every latent is a code (and random ones again): nothing to cluster. Branch-free, for torch.compile."""
        K, N = self.num_embeddings, len(flat)
        if K >= N:
            extra = torch.randint(N, (K - N,), device=flat.device)
            self._assign(torch.ones(K, dtype=torch.bool, device=flat.device), flat[torch.cat([torch.randperm(
                N, device=flat.device), extra])])
        else:
            # k-means++ seeding: each next centroid is a latent drawn with probability proportional to its squared
            # distance to the nearest centroid so far, so that separate clusters get one each (uniform seeding
            # often puts two in one cluster, a local minimum that Lloyd's steps never leave).
            centroids = flat[torch.randint(N, (1,), device=flat.device)]
            d2 = ((flat - centroids) ** 2).sum(1)                                  # (N,)
            for _ in range(1, K):
                weights = torch.where(d2.sum() > 0, d2, 1.0)                      # all 0: fewer distinct latents than K
                centroids = torch.cat([centroids, flat[torch.multinomial(weights, 1)]])
                d2 = torch.minimum(d2, ((flat - centroids[-1]) ** 2).sum(1))
            for _ in range(iterations):
                counts, sums = _code_statistics(flat, nearest_code(flat, centroids), K)
                # an empty cluster keeps its centroid
                centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
            self._assign(torch.ones(K, dtype=torch.bool, device=flat.device), centroids)
        self.initialized.fill_(True)
        self._initialized = True

    def _assign(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        """codebook[mask] = values (process 0's), the EMA state of those codes reset: chosen once, by themselves."""
        if _distributed():
            values = values.contiguous()
            dist.broadcast(values, src=0)
        self.codebook.data.copy_(torch.where(mask[:, None], values.to(self.codebook.dtype), self.codebook.data))
        self.ema_cluster_size.copy_(torch.where(mask, 1.0, self.ema_cluster_size))
        if self.decay is not None:
            self.ema_embed_sum.copy_(torch.where(mask[:, None], self.codebook, self.ema_embed_sum))

    @torch.no_grad()
    def kmeans(self, z_e: torch.Tensor) -> None:
        """The codebook from k-means on the latents z_e (as forward() takes them), as kmeans_init does on the
        first training batch."""
        self._kmeans_init(z_e.float().movedim(-1 if self.channel_last else 1, -1).reshape(-1, self.embedding_dim))

    # ---- PyTorch's module plumbing: the state in float32, the flag of k-means done kept with its buffer ----
    def _apply(self, fn, recurse=True):
        """.to(), .half(), .bfloat16(), .cuda(): devices change, but the codebook and its statistics stay in
        float32 (or float64): in 16 bits the moving averages stall and distances lose the codes' order."""
        kept = {name: t.data for name, t in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]
                if t.is_floating_point()}   # .data: the tensors as they are, whatever _apply puts in their place
        super()._apply(fn, recurse)
        for name, before in kept.items():
            now = getattr(self, name)
            if now.dtype in (torch.float16, torch.bfloat16):
                now.data = before.to(now.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, *S) -> z_q (B, D, *S), or (B, *S, D) with channel_last. Raises ValueError for
        values outside [0, K)."""
        _require(codes.dim() >= (1 if self.channel_last else 2), "codes: expected an integer (B, *S) tensor", codes)
        _check_range(codes, "codes", self.num_embeddings)
        z_q = F.embedding(codes.long(), self.codebook)
        return z_q if self.channel_last else z_q.movedim(-1, 1)


# ---- Encoder and decoder (Sec. 4.1): strided 4x4 convolutions and residual blocks ------------------
def _conv(dims: int, transposed: bool = False):
    _require(dims in (1, 2, 3), f"dims: expected 1, 2 or 3; got {dims}")
    return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv1d, nn.Conv2d, nn.Conv3d)[
        dims - 1 + (0 if transposed else 3)]


class ResidualStack(nn.Module):
    """num_layers residual blocks x + conv1x1(relu(conv3x3(relu(x)))), then a ReLU. Keeps shape."""
    def __init__(self, channels: int, res_channels: int, num_layers: int, dims: int = 2):
        super().__init__()
        conv = _conv(dims)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), conv(channels, res_channels, 3, padding=1), nn.ReLU(),
                                                  conv(res_channels, channels, 1)) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """x (B, C, *S) -> (B, hidden, *S / 2**num_downsamples): num_downsamples stride-2 convolutions of
    window 4 (paper: 2 for 32x32 images, 6 for audio), a 3x3 convolution, the residual stack. Strided
    convolutions before the last have outer_channels (default hidden; Sonnet's example: hidden / 2)."""
    def __init__(self, in_channels: int, hidden_channels: int = 256, res_channels: int = 256,
                 num_res_layers: int = 2, num_downsamples: int = 2, dims: int = 2, outer_channels: int | None = None):
        super().__init__()
        conv, layers, outer = _conv(dims), [], outer_channels or hidden_channels
        for i in range(num_downsamples):
            out = hidden_channels if i == num_downsamples - 1 else outer
            layers += [conv(in_channels if i == 0 else outer, out, 4, stride=2, padding=1), nn.ReLU()]
        layers += [conv(hidden_channels if num_downsamples else in_channels, hidden_channels, 3, padding=1),
                   ResidualStack(hidden_channels, res_channels, num_res_layers, dims)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, D, *S) -> (B, out_channels, *S * 2**num_upsamples): the encoder mirrored, with transposed
    stride-2 convolutions of window 4 (those before the last: outer_channels out)."""
    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 256, res_channels: int = 256,
                 num_res_layers: int = 2, num_upsamples: int = 2, dims: int = 2, outer_channels: int | None = None):
        super().__init__()
        conv, conv_t, outer = _conv(dims), _conv(dims, transposed=True), outer_channels or hidden_channels
        layers = [conv(in_channels, hidden_channels, 3, padding=1),
                  ResidualStack(hidden_channels, res_channels, num_res_layers, dims)]
        for i in range(num_upsamples):
            last = i == num_upsamples - 1
            layers.append(conv_t(hidden_channels if i == 0 else outer, out_channels if last else outer, 4, 2, 1))
            layers += [] if last else [nn.ReLU()]
        self.net = nn.Sequential(*layers, *([] if num_upsamples else [conv(hidden_channels, out_channels, 1)]))

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(z_q)


# ---- The VQ-VAE: encoder, 1x1 projection to D, quantizer, decoder, and the loss of Eq. 3 -----------
class _Config:
    """Every config checks its fields when made (_check_fields, in the appendix at the end of the file)."""
    def __post_init__(self):
        _check_fields(type(self).__name__, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass
class VQVAEConfig(_Config):
    in_channels: int = 3
    hidden_channels: int = 256           # paper, Sec. 4.1: "all having 256 hidden units"
    outer_channels: int | None = None    # the outer strided convolutions; None: hidden (Sonnet: hidden / 2)
    res_channels: int = 256              # the Sonnet example uses 32
    num_res_layers: int = 2
    num_downsamples: int = 2             # 32x32 -> 8x8
    dims: int = 2                        # spatial rank: 1 audio, 2 images, 3 video
    num_embeddings: int = 512            # K
    embedding_dim: int = 64              # D
    num_groups: int = 1                  # codes per latent position (paper's bits/dim model: 8x8x10)
    commitment_cost: float = 0.25        # beta
    decay: float | None = None           # 0.99 for the EMA codebook of App. A.1
    epsilon: float = 1e-5
    kmeans_init: bool = False
    dead_code_threshold: float | None = 0.1     # not in the paper (VectorQuantizer); None: the paper's quantizer
    likelihood: str = "gaussian"         # "gaussian" (MSE) or "categorical" (256-way per channel)
    data_variance: float = 1.0           # Gaussian decoder: loss = MSE / data_variance (Sonnet)


class VQVAEOutput(NamedTuple):
    x_recon: torch.Tensor               # (B, C, *S) reconstruction in the input's [-0.5, 0.5] scale
    logits: torch.Tensor | None         # (B, C, *S, 256) for the categorical decoder, else None
    z_e: torch.Tensor                   # (B, G*D, *S') encoder output
    z_q: torch.Tensor                   # (B, G*D, *S') quantized
    codes: torch.Tensor                 # (B, *S') if G == 1 else (B, G, *S'), int64
    recon_loss: torch.Tensor            # -log p(x|z_q) per dim: MSE / data_variance, or nats
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    loss: torch.Tensor                  # Eq. 3: recon + codebook + commitment
    perplexity: torch.Tensor
    counts: torch.Tensor                # (K,)


class VQVAE(nn.Module):
    """The VQ-VAE of Sec. 3 with the architecture of Sec. 4.1. x: float (B, C, *S) in [-0.5, 0.5] (x_uint8 /
    255 - 0.5), each spatial size a multiple of 2**num_downsamples. With num_groups = G > 1 each latent
    position holds G codes of the one codebook (z_e has G*D channels)."""
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = c = config
        categorical = c.likelihood == "categorical"
        self.encoder = Encoder(c.in_channels, c.hidden_channels, c.res_channels, c.num_res_layers, c.num_downsamples,
                               c.dims, c.outer_channels)
        self.pre_quantize = _conv(c.dims)(c.hidden_channels, c.num_groups * c.embedding_dim, 1)
        self.quantizer = VectorQuantizer(c.num_embeddings, c.embedding_dim, c.commitment_cost, c.decay,
                                         c.epsilon, c.kmeans_init, c.dead_code_threshold)
        self.decoder = Decoder(c.num_groups * c.embedding_dim, c.hidden_channels if categorical else c.in_channels,
                               c.hidden_channels, c.res_channels, c.num_res_layers, c.num_downsamples, c.dims,
                               c.outer_channels)
        # 256 logits per channel from a 1x1 convolution: 4x cheaper than a last 4x4 transposed one.
        self.logits = nn.Sequential(nn.ReLU(), _conv(c.dims)(c.hidden_channels, 256 * c.in_channels, 1)) \
            if categorical else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) -> z_e (B, G*D, *S / 2**num_downsamples). Raises ValueError on bad x."""
        c, dtype = self.config, self.pre_quantize.weight.dtype
        _require(x.dim() == c.dims + 2 and x.shape[1] == c.in_channels and x.dtype == dtype and x.shape[0] > 0
                 and all(s > 0 and s % 2 ** c.num_downsamples == 0 for s in x.shape[2:]),
                 f"x: expected a (B, {c.in_channels}, *S) tensor of the model's dtype {dtype} with {c.dims} spatial "
                 f"dims, B > 0 and each spatial size a multiple of {2 ** c.num_downsamples}", x)
        return self.pre_quantize(self.encoder(x))

    def quantize(self, z_e: torch.Tensor) -> VQOutput:
        """Quantize z_e (B, G*D, *S), each of the G groups with the shared codebook."""
        G, D = self.config.num_groups, self.config.embedding_dim
        if G == 1:
            return self.quantizer(z_e)
        out = self.quantizer(z_e.unflatten(1, (G, D)).transpose(1, 2))  # (B, D, G, *S)
        return out._replace(z_q=out.z_q.transpose(1, 2).flatten(1, 2))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, *S') if G == 1 else (B, G, *S') -> images (B, C, *S) in [-0.5, 0.5], the mean of
        p(x|z_q). Raises ValueError for a wrong rank or codes outside [0, K)."""
        G, rank = self.config.num_groups, self.config.dims + (1 if self.config.num_groups == 1 else 2)
        _require(codes.dim() == rank and (G == 1 or codes.shape[1] == G),
                 f"codes: expected a tensor with {rank} dims" + ("" if G == 1 else f", shape[1] == {G}"), codes)
        z_q = self.quantizer.lookup(codes)  # (B, D, [G,] *S') -> (B, G*D, *S'), group-major as in quantize
        return self.to_image(self.decoder_output(z_q if G == 1 else z_q.transpose(1, 2).flatten(1, 2)))

    def decoder_output(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, G*D, *S') -> Gaussian mean (B, C, *S) or categorical logits (B, C, *S, 256)."""
        out = self.decoder(z_q)
        if self.logits is not None:
            # The 1x1 convolution as a product over channels-last features: the logits come out as
            # (B, *S, C, 256), whose softmax needs no copy; the (B, C, *S, 256) result is a view of it.
            relu, conv = self.logits
            out = F.linear(relu(out).movedim(1, -1), conv.weight.flatten(1), conv.bias)
            out = out.unflatten(-1, (self.config.in_channels, 256)).movedim(-2, 1)
        return out

    def to_image(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [-0.5, 0.5]: the mean (the categorical's expected value)."""
        if self.config.likelihood == "gaussian":
            return decoder_output
        levels = torch.arange(256, device=decoder_output.device, dtype=torch.float32) / 255 - 0.5
        return (decoder_output.movedim(1, -2).float().softmax(-1) @ levels).movedim(-1, 1)

    def log_likelihood(self, x: torch.Tensor, decoder_output: torch.Tensor) -> torch.Tensor:
        """log p(x|z_q) in nats per example, (B,): the categorical decoder only (discrete x)."""
        _require(self.config.likelihood == "categorical", "log_likelihood needs likelihood='categorical'")
        target = ((x.float() + 0.5) * 255).round().clamp(0, 255).long()    # (B, C, *S) in 0..255
        log_probs = decoder_output.movedim(1, -2).float().log_softmax(-1)   # (B, *S, C, 256)
        return log_probs.gather(-1, target.movedim(1, -1).unsqueeze(-1)).flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        z_e = self.encode(x)
        vq = self.quantize(z_e)
        out = self.decoder_output(vq.z_q)
        if self.logits is None:
            recon_loss = F.mse_loss(out.float(), x.float()) / self.config.data_variance
        else:
            recon_loss = -self.log_likelihood(x, out).mean() / x[0].numel()
        loss = recon_loss + vq.codebook_loss + vq.commitment_loss   # Eq. 3 (recon is -log p(x|z_q))
        return VQVAEOutput(self.to_image(out), None if self.logits is None else out, z_e, vq.z_q, vq.codes,
                           recon_loss, vq.codebook_loss, vq.commitment_loss, loss, vq.perplexity, vq.counts)


# ---- The prior (Sec. 3.2, 4.2): a gated PixelCNN over the map of codes, trained after the VQ-VAE ----
# y = tanh(W_f * x + V_f h) . sigmoid(W_g * x + V_g h), h a class (or a conditioning map). A vertical
# stack sees the rows up to its own and enters a horizontal stack shifted down one row; the horizontal
# stack adds the pixels to the left: together everything before a pixel in raster order (no blind spot).
def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks; `first` masks the current pixel (mask A, no residual)."""
    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int | None, cond_channels: int):
        super().__init__()
        k, self.first = kernel_size, first
        self.vertical = nn.Conv2d(channels, 2 * channels, (k // 2 + 1, k))   # rows i-k//2 .. i
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, k // 2 + (0 if first else 1)))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        self.cond_bias = nn.Conv2d(cond_channels, 2 * channels, 1) if cond_channels else None

    def forward(self, v, h, label=None, cond=None):
        """v, h (B, c, H, W) -> the next layer's (v, h)."""
        v_pre = self.vertical_pre(v)                                          # (B, 2c, H, W)
        # Row i of the horizontal stack may only see vertical features of rows < i: shift down.
        h = self.horizontal_step(h, F.pad(v_pre, (0, 0, 1, 0))[:, :, :v.shape[2]], label, cond)
        return _gate(self.add_biases(v_pre, label, cond)), h

    def vertical_pre(self, v):
        """Vertical stack before the biases: row i sees rows i - k//2 .. i."""
        k = self.vertical.kernel_size[1]
        return self.vertical(F.pad(v, (k // 2, k // 2, k // 2, 0)))

    def add_biases(self, x, label, cond):
        if self.class_bias is not None:
            x = x + self.class_bias(label)[:, :, None, None]
        return x if self.cond_bias is None else x + self.cond_bias(cond)

    def horizontal_step(self, h, above, label, cond):
        """Horizontal stack on rows h (B, c, R, W), given vertical_pre of the row above each, above
        (B, 2c, R, W): position j sees j - k//2 .. j (the first layer: .. j - 1) of its own row."""
        k = self.vertical.kernel_size[1]
        h_pre = self.horizontal(F.pad(h, (k // 2, 0)))[..., :h.shape[3]] + self.vertical_to_horizontal(above)
        h_out = self.horizontal_out(_gate(self.add_biases(h_pre, label, cond)))
        return h_out if self.first else h + h_out


@dataclass
class GatedPixelCNNConfig(_Config):
    num_embeddings: int = 512            # K of the VQ-VAE whose codes it models
    num_groups: int = 1                  # G, the VQ-VAE's codes per latent position
    channels: int = 128
    num_layers: int = 12
    kernel_size: int = 5                 # odd, >= 3
    num_classes: int | None = None       # a learnt class-conditional bias in every layer
    cond_channels: int = 0               # > 0: a conditioning map (B, cond_channels, H, W) biases every layer


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(z) = prod_i p(z_i | z_<i, class) over maps of codes (raster order); codes
    (B, H, W) if G == 1 else (B, G, H, W), int64 in [0, K). With num_groups = G > 1 the stacks see all codes
    of earlier positions, and a head adds the embeddings of the same position's earlier groups."""
    def __init__(self, config: GatedPixelCNNConfig):
        super().__init__()
        self.config = c = config
        self.num_embeddings, self.num_groups, self.num_classes = c.num_embeddings, c.num_groups, c.num_classes
        self.embedding = nn.Embedding(c.num_embeddings * c.num_groups, c.channels)
        self.layers = nn.ModuleList(GatedLayer(c.channels, c.kernel_size, i == 0, c.num_classes, c.cond_channels)
                                    for i in range(c.num_layers))
        self.group_embedding = nn.Embedding(c.num_embeddings * c.num_groups, c.channels)  # same position
        self.group_query = nn.Parameter(torch.zeros(c.channels, c.num_groups))  # laid out as used: no transpose
        self.head = nn.Sequential(nn.ReLU(), nn.Conv3d(c.channels, c.channels, 1), nn.ReLU(),
                                  nn.Conv3d(c.channels, c.num_embeddings, 1))

    def _grouped(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, G, H, W) ids into the embeddings, a separate range of K per group."""
        grouped, G = (codes[:, None] if self.num_groups == 1 else codes), self.num_groups
        _require(grouped.dim() == 4 and grouped.shape[1] == G and not codes.is_floating_point() and len(codes) > 0,
                 "codes: expected an integer " + ("(B, H, W)" if G == 1 else f"(B, {G}, H, W)") + " tensor", codes)
        _check_range(codes, "codes", self.num_embeddings)
        return grouped.long() + torch.arange(G, device=codes.device)[None, :, None, None] * self.num_embeddings

    def _check_label(self, label: torch.Tensor | None, batch: int) -> None:
        _require((self.num_classes is None) == (label is None),
                 "label: pass class labels (B,) exactly when the model has num_classes")
        if label is not None:
            _require(label.dim() == 1 and not label.is_floating_point() and len(label) == batch,
                     f"label: expected an integer ({batch},) tensor, one id per example", label)
            _check_range(label, "label", self.num_classes)

    def forward(self, codes: torch.Tensor, label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) if G == 1 else (B, K, G, H, W), for p(z_i | z_<i)."""
        grouped = self._grouped(codes)                                      # (B, G, H, W)
        self._check_label(label, len(codes))
        v = h = self._embed(grouped)                                        # (B, c, H, W)
        for layer in self.layers:
            v, h = layer(v, h, label, cond)
        logits = self._head(h, grouped)
        return logits[:, :, 0] if self.num_groups == 1 else logits         # (B, K, [G,] H, W)

    def _embed(self, grouped: torch.Tensor) -> torch.Tensor:
        return self.embedding(grouped).sum(1).permute(0, 3, 1, 2)          # (B, G, H, W) -> (B, c, H, W)

    def _head(self, h: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, G, H, W) from the last horizontal stack h (B, c, H, W)."""
        # Within a position, group g sees the groups < g (exclusive cumulative sum).
        same = self.group_embedding(grouped).permute(0, 4, 1, 2, 3)          # (B, c, G, H, W)
        earlier = same.cumsum(2) - same
        return self.head(h[:, :, None] + earlier + self.group_query[None, :, :, None, None])

    def log_prob(self, codes: torch.Tensor, label: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z) in nats, (B,)."""
        return -F.cross_entropy(self(codes, label, cond), codes.long(), reduction="none").flatten(1).sum(1)

    # ---- Not in the paper: fast sampling (each row's vertical stack once) and classifier-free guidance ----
    @torch.no_grad()
    def sample(self, shape: tuple[int, int], label: torch.Tensor | None = None, batch_size: int | None = None,
               cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0, guidance: float = 0.0, unconditioned: int = 1) -> torch.Tensor:
        """Draw codes (B, H, W) (or (B, G, H, W)) for shape = (H, W) in raster order; B = len(label) for a
        class-conditional model, else batch_size. ValueError names a bad argument. With a seeded generator, the codes
        that sampling forward()'s logits draws, without recomputing what cannot change (as P. Ramachandran et al.,
        "Fast Generation for Convolutional Autoregressive Models", 2017): the vertical stack once per row, the
        horizontal stack on the current row. guidance = w > 0 (classifier-free guidance, arXiv:2207.12598): B
        conditioned rows (label, cond) then M = unconditioned blocks of B whose mean distribution stands for the
        unconditioned one (M = 1: a null label or map; M > 1: the conditions to average over); each code is drawn from
        log p_cond + w (log p_cond - log p_uncond) (_guided) and written to every block; the B conditioned codes are
        returned."""
        B, blocks = _check_sample(self, shape, label, batch_size, temperature, guidance, unconditioned)
        K = self.num_embeddings
        offsets = torch.arange(self.num_groups, device=self.embedding.weight.device)[None, :, None, None] * K
        grouped = offsets + torch.zeros(B, self.num_groups, *shape, dtype=torch.long, device=offsets.device)
        for i in range(shape[0]):
            above, cond_row = self._rows_above(grouped, i, label, cond), None if cond is None else cond[:, :, i:i + 1]
            for j in range(shape[1]):
                for g in range(self.num_groups):
                    logits = self._logits_at(grouped, above, i, j, g, label, cond_row)   # (B, K)
                    if guidance:
                        logits = _guided(logits, blocks, guidance, unconditioned)       # (B / blocks, K)
                    drawn = torch.multinomial((logits / temperature).softmax(1), 1, generator=generator)[:, 0]
                    grouped[:, g, i, j] = drawn.repeat(blocks) + g * K
        codes = (grouped - offsets)[:B // blocks]
        return codes if self.num_groups > 1 else codes[:, 0]

    def _rows_above(self, grouped, i, label, cond) -> list[torch.Tensor]:
        """All that row i sees of the rows above: each layer's vertical_pre of row i - 1."""
        above, v = [], self._embed(grouped[:, :, :i]) if i > 0 else None
        for layer in self.layers:
            if v is None:  # row 0: as forward()'s zero padding above the map
                above.append(layer.vertical.weight.new_zeros(len(grouped), layer.vertical.out_channels, 1,
                                                             grouped.shape[3]))
                continue
            v_pre = layer.vertical_pre(v)
            above.append(v_pre[:, :, -1:])
            v = _gate(layer.add_biases(v_pre, label, None if cond is None else cond[:, :, :i]))
        return above

    def _logits_at(self, grouped, above, i, j, g, label, cond_row) -> torch.Tensor:
        """float32 logits (B, K) of code g at position (i, j), the horizontal stack run on row i."""
        row = grouped[:, :, i:i + 1]                                         # (B, G, 1, W)
        h = self._embed(row)
        for layer, a in zip(self.layers, above):
            h = layer.horizontal_step(h, a, label, cond_row)
        return self._head(h[..., j:j + 1], row[..., j:j + 1])[:, :, g, 0, 0].float()


def _guided(logits: torch.Tensor, blocks: int, w: float, unconditioned: int) -> torch.Tensor:
    """Classifier-free guidance of logits (blocks x B', K), the conditioned rows first: log p_cond +
    w (log p_cond - log p_uncond), p_uncond the mean of the `unconditioned` blocks' distributions."""
    log_p = logits.log_softmax(1).unflatten(0, (blocks, -1))                    # (1 + M, B', K)
    log_uncond = log_p[1:].logsumexp(0) - math.log(unconditioned)
    return log_p[0] + w * (log_p[0] - log_uncond)


# ---- Sec. 4.1: the bound log p(x) >= log p(x|z_q(x)) + log p(z_q(x)), in bits per dimension ----------
def bits_per_dim(log_px_given_z: torch.Tensor, num_dims: int, log_pz: torch.Tensor | None = None,
                 num_latents: int | None = None, num_embeddings: int | None = None) -> torch.Tensor:
    """-(log p(x|z_q) + log p(z)) / (num_dims * ln 2), (B,): log_px_given_z (B,) nats; num_dims of one x
    (3072 for a 32x32x3 image); log_pz (B,) nats from a prior, or None for the uniform prior of training,
    log p(z) = -num_latents * log num_embeddings (the constant KL of Sec. 3.1)."""
    if log_pz is None:
        _require(num_latents is not None and num_embeddings is not None,
                 "bits_per_dim: pass log_pz, or num_latents and num_embeddings for the uniform prior")
        log_pz = torch.full_like(log_px_given_z, -num_latents * math.log(num_embeddings))
    return -(log_px_given_z + log_pz) / (num_dims * math.log(2))


# =====================================================================================================
# The image model ends here: nearest_code, VectorQuantizer, Encoder/Decoder, VQVAE, GatedPixelCNN and
# bits_per_dim are all of Sec. 3-4.2. Below: speech (Sec. 4.3), video (Sec. 4.4), then the appendix.
# =====================================================================================================


# ---- Speech (Sec. 4.3): an encoder of 6 stride-2 convolutions of window 4 (64x fewer latents than ---
# samples), K = 512, and a WaveNet decoder (arXiv:1609.03499) conditioned on z_q and a speaker. Samples
# are mu-law companded to 256 levels (WaveNet Sec. 2.2): F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu).
def mu_law_encode(x: torch.Tensor, mu: int = 255) -> torch.Tensor:
    """Waveform in [-1, 1] (any shape) -> int64 levels in [0, mu]; 0.0 maps to level 128."""
    y = torch.sign(x) * torch.log1p(mu * x.abs().clamp(max=1)) / math.log1p(mu)
    return ((y + 1) / 2 * mu).round().long()


def mu_law_decode(levels: torch.Tensor, mu: int = 255) -> torch.Tensor:
    """Levels in [0, mu] -> waveform in [-1, 1], the inverse of F."""
    y = 2 * levels.float() / mu - 1
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


@dataclass
class WaveNetConfig(_Config):
    num_categories: int = 256            # the categorical output: 256 mu-law levels (decoder), or K codes (prior)
    cond_channels: int = 0               # D of z_q (decoder); 0: no local conditioning (prior)
    num_speakers: int = 109              # VCTK
    hop: int = 64                        # steps per conditioning frame: 2 ** the encoder's downsamplings
    channels: int = 64                   # residual channels
    skip_channels: int = 64
    num_layers: int = 10
    cycle: int = 10                      # dilations 1, 2, ..., 2^(cycle - 1), repeated


class WaveNet(nn.Module):
    """p(x_t | x_<t, z_q, s): num_categories logits per step (WaveNet, Sec. 2). Layer i (WaveNet Eq. 2):
        z = tanh(W_f * x + V_f c + U_f s) . sigmoid(W_g * x + V_g c + U_g s); x <- x + 1x1(z), skip += 1x1(z)
    W * x: causal, window 2, dilation 2^(i mod cycle); c: z_q repeated `hop` times along time; s: a learnt
    speaker embedding; before the first step: category num_categories // 2 (level 128: silence). Decoder:
    levels (4, 4096), z_q (4, 64, 64), speaker (4,) -> logits (4, 256, 4096). Prior over speech codes
    ("another WaveNet on top of these latents", the authors' samples page): num_categories = K,
    cond_channels = 0, z_q = None: codes (4, 125) -> logits (4, 512, 125)."""
    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = c = config
        self.hop = c.hop if c.cond_channels else 1
        self.channels, self.skip_channels, self.num_categories = c.channels, c.skip_channels, c.num_categories
        self.dilations = [2 ** (i % c.cycle) for i in range(c.num_layers)]
        self.embed = nn.Embedding(c.num_categories, c.channels)                  # x_{t-1}
        self.dilated = nn.ModuleList(nn.Conv1d(c.channels, 2 * c.channels, 2, dilation=d) for d in self.dilations)
        self.cond = nn.Conv1d(c.cond_channels, c.num_layers * 2 * c.channels, 1) if c.cond_channels else None
        self.speaker = nn.Embedding(c.num_speakers, c.num_layers * 2 * c.channels)  # U_f s, U_g s
        self.res_skip = nn.ModuleList(nn.Conv1d(c.channels, c.channels + c.skip_channels, 1) for _ in self.dilations)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(c.skip_channels, c.skip_channels, 1), nn.ReLU(),
                                  nn.Conv1d(c.skip_channels, c.num_categories, 1))

    def _conditioning(self, z_q: torch.Tensor | None, speaker: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, L, 2C, frames): V c + U s of every layer at the rate of the codes (hop steps each)."""
        batch = len(speaker) if z_q is None else len(z_q)
        _require(speaker.dim() == 1 and not speaker.is_floating_point() and len(speaker) == batch,
                 f"speaker: expected an integer ({batch},) tensor, one id per example", speaker)
        _check_range(speaker, "speaker", self.speaker.num_embeddings)
        _require((z_q is None) == (self.cond is None),
                 "z_q: pass it exactly when the WaveNet has local conditioning (cond_channels > 0)")
        c = self.speaker(speaker)[:, :, None]                                  # (B, L*2C, 1)
        if z_q is None:
            c = c.expand(-1, -1, frames)
        else:
            _require(z_q.dim() == 3 and z_q.shape[1] == self.cond.in_channels,
                     f"z_q: expected a (B, {self.cond.in_channels}, T') tensor", z_q)
            c = c + self.cond(z_q)
        return c.unflatten(1, (len(self.dilations), 2 * self.channels))       # (B, L, 2C, frames)

    def forward(self, x: torch.Tensor, z_q: torch.Tensor | None, speaker: torch.Tensor) -> torch.Tensor:
        """x (B, T) int64 in [0, num_categories), z_q (B, D, T / hop) or None, speaker (B,)
        -> logits (B, num_categories, T)."""
        cond = self._conditioning(z_q, speaker, x.shape[-1] if z_q is None else z_q.shape[-1])
        _require(x.dim() == 2 and not x.is_floating_point() and x.shape == (len(speaker), cond.shape[-1] * self.hop),
                 f"x: expected an integer (B, T) tensor with B = {len(speaker)} speakers and T = {self.hop} x "
                 f"{cond.shape[-1]} conditioning steps", x)
        h = self.embed(F.pad(x, (1, -1), value=self.num_categories // 2)).transpose(1, 2)  # (B, C, T), x_{t-1}
        skip = 0
        for i, d in enumerate(self.dilations):
            a = self.dilated[i](F.pad(h, (d, 0))) + cond[:, i].repeat_interleave(self.hop, -1)
            res, s = self.res_skip[i](_gate(a)).split([self.channels, self.skip_channels], 1)
            h, skip = h + res, skip + s
        return self.head(skip)

    def log_prob(self, x: torch.Tensor, z_q: torch.Tensor | None, speaker: torch.Tensor) -> torch.Tensor:
        """log p(x | z_q, speaker) in nats, (B,): the sum over the T steps of forward()'s logits."""
        return -F.cross_entropy(self(x, z_q, speaker), x.long(), reduction="none").sum(1)

    # ---- Not in the paper: fast generation (a ring buffer per layer instead of a pass over the window) ----
    @torch.inference_mode()
    def sample(self, z_q: torch.Tensor | None, speaker: torch.Tensor, generator: torch.Generator | None = None,
               greedy: bool = False, temperature: float = 1.0, return_logits: bool = False,
               length: int | None = None):
        """Sample x (B, T) int64 step by step; T = hop * T' with z_q (B, D, T'), else `length`. With return_logits also
        the (B, num_categories, T) logits. Fast WaveNet (T. L. Paine et al., arXiv:1611.09482): layer i keeps its last
        d_i inputs in a ring buffer, so a step costs one matrix product per layer, not a pass over the receptive field;
        teacher-forcing the samples through forward() gives the same logits."""
        _require(z_q is not None or length is not None, "length: needed when there is no z_q to give the steps")
        _require(math.isfinite(temperature) and temperature > 0,
                 f"temperature: expected a finite number > 0; got {temperature}")
        frames = length if z_q is None else z_q.shape[2]
        B, T, C, device = speaker.shape[0], frames * self.hop, self.channels, speaker.device
        biases = torch.stack([conv.bias for conv in self.dilated])[None, :, :, None]
        cond = self._conditioning(z_q, speaker, frames) + biases              # (B, L, 2C, T')
        # A window-2 dilated convolution is one product of [x_{t-d}, x_t] with (2C, 2C) weights.
        taps = [torch.cat([conv.weight[:, :, 0], conv.weight[:, :, 1]], 1).t() for conv in self.dilated]
        res = [(conv.weight[:C, :, 0].t(), conv.bias[:C]) for conv in self.res_skip]
        skip_w = torch.cat([conv.weight[C:, :, 0] for conv in self.res_skip], 1).t()   # (L*C, S)
        skip_b = sum(conv.bias[C:] for conv in self.res_skip)
        buffers = [cond.new_zeros(d, B, C) for d in self.dilations]           # x_{t-d} .. x_{t-1}
        out = torch.empty(B, T, dtype=torch.long, device=device)
        logits_all = cond.new_empty(B, self.num_categories, T) if return_logits else None
        x = torch.full((B,), self.num_categories // 2, dtype=torch.long, device=device)
        for t in range(T):
            h, gated, c = self.embed(x), [], cond[:, :, :, t // self.hop].unbind(1)  # (B, C), L x (B, 2C)
            for i, d in enumerate(self.dilations):
                a = torch.addmm(c[i], torch.cat([buffers[i][t % d], h], 1), taps[i])
                buffers[i][t % d] = h                                          # read before write
                gated.append(torch.tanh(a[:, :C]) * torch.sigmoid(a[:, C:]))
                h = torch.addmm(h + res[i][1], gated[-1], res[i][0])
            skip = torch.addmm(skip_b, torch.cat(gated, 1), skip_w)            # sum of all skips
            logits = self.head(skip[:, :, None])[:, :, 0]                     # (B, num_categories)
            probs = (logits.float() / temperature).softmax(1)
            x = logits.argmax(1) if greedy else torch.multinomial(probs, 1, generator=generator)[:, 0]
            out[:, t] = x
            if return_logits:
                logits_all[:, :, t] = logits
        return (out, logits_all) if return_logits else out


@dataclass
class AudioVQVAEConfig(_Config):
    num_speakers: int = 109              # VCTK
    hidden_channels: int = 128           # encoder; the paper gives no layer sizes for speech
    res_channels: int = 64
    num_res_layers: int = 2
    num_downsamples: int = 6             # paper: 64x fewer latents than samples
    num_embeddings: int = 512            # K, paper: 512
    embedding_dim: int = 64              # D
    commitment_cost: float = 0.25        # beta
    decay: float | None = 0.99           # EMA codebook (App. A.1), or None for the codebook loss
    kmeans_init: bool = False            # not in the paper, see VectorQuantizer
    dead_code_threshold: float | None = 0.1     # not in the paper (VectorQuantizer); None: the paper's quantizer
    wavenet_channels: int = 64
    skip_channels: int = 64
    wavenet_layers: int = 10
    dilation_cycle: int = 10             # dilations 1, 2, ..., 2^(cycle - 1), repeated


class AudioVQVAEOutput(NamedTuple):
    logits: torch.Tensor                # (B, 256, T) p(x_t | x_<t, z_q, speaker)
    codes: torch.Tensor                 # (B, T / 64) int64
    recon_loss: torch.Tensor            # -log p(x|z_q) in nats per sample
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    loss: torch.Tensor                  # Eq. 3
    perplexity: torch.Tensor
    counts: torch.Tensor                # (K,)


class AudioVQVAE(nn.Module):
    """Encoder (dims=1) -> 1x1 conv to D -> VectorQuantizer -> WaveNet(z_q, speaker). Example: mu-law
    levels (8, 4096) int64 and speaker ids (8,) -> codes (8, 64), logits (8, 256, 4096)."""
    def __init__(self, config: AudioVQVAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(1, c.hidden_channels, c.res_channels, c.num_res_layers, c.num_downsamples, dims=1)
        self.pre_quantize = nn.Conv1d(c.hidden_channels, c.embedding_dim, 1)
        self.quantizer = VectorQuantizer(c.num_embeddings, c.embedding_dim, c.commitment_cost, c.decay,
                                         kmeans_init=c.kmeans_init, dead_code_threshold=c.dead_code_threshold)
        self.decoder = WaveNet(WaveNetConfig(256, c.embedding_dim, c.num_speakers, 2 ** c.num_downsamples,
                                             c.wavenet_channels, c.skip_channels, c.wavenet_layers, c.dilation_cycle))

    def encode(self, levels: torch.Tensor) -> torch.Tensor:
        """Levels (B, T) -> z_e (B, D, T / 64); the encoder sees 2 * level / 255 - 1 in [-1, 1]."""
        hop = 2 ** self.config.num_downsamples
        _require(levels.dim() == 2 and not levels.is_floating_point() and levels.shape[1] % hop == 0
                 and levels.shape[1] > 0, f"levels: expected an integer (B, T) tensor, T a multiple of {hop}", levels)
        return self.pre_quantize(self.encoder((2 * levels.float() / 255 - 1)[:, None]))

    def forward(self, levels: torch.Tensor, speaker: torch.Tensor) -> AudioVQVAEOutput:
        vq = self.quantizer(self.encode(levels))
        logits = self.decoder(levels, vq.z_q, speaker)
        recon_loss = F.cross_entropy(logits.float(), levels)                  # nats per sample
        loss = recon_loss + vq.codebook_loss + vq.commitment_loss             # Eq. 3
        return AudioVQVAEOutput(logits, vq.codes, recon_loss, vq.codebook_loss, vq.commitment_loss,
                                loss, vq.perplexity, vq.counts)

    def decode(self, codes: torch.Tensor, speaker: torch.Tensor, **sample_kwargs) -> torch.Tensor:
        """Codes (B, T') decoded as speaker (B,): the waveform (B, 64 T') in [-1, 1], of mu-law levels
        sampled from the WaveNet decoder (sample_kwargs: WaveNet.sample's, but return_logits). Speaker
        conversion is the codes of one speaker's clip decoded with another's id."""
        return mu_law_decode(self.decoder.sample(self.quantizer.lookup(codes), speaker, **sample_kwargs))


# ---- Sec. 4.4: video in latent space. The prior over the codes of frame t+1 is conditioned on the ---
# codes of the frames before it and on the action; videos are sampled as codes, decoded at the end.
@dataclass
class ActionConditionalPriorConfig(_Config):
    num_embeddings: int = 512            # K of the frame VQ-VAE
    num_actions: int = 3                 # size of the discrete action set
    context_frames: int = 4              # F
    channels: int = 64                   # the PixelCNN (also the embedding width)
    num_layers: int = 4
    kernel_size: int = 5
    context_channels: int = 128          # the context network: 3x3 convolutions, residual blocks
    context_layers: int = 4
    embedding_dim: int = 0               # D > 0: context frames enter as the VQ-VAE's z_q (set_codebook)


class ActionConditionalPrior(nn.Module):
    """p(z_t+1 | z_t-F+1..t, a_t) = prod_i p(z_t+1,i | z_t+1,<i, z_t-F+1..t, a_t), over the grid. A context
    network reads the last F = context_frames frames (a learned embedding of their codes or, embedding_dim =
    D, their z_q) and the action; its map conditions every layer of a gated PixelCNN over the new frame. It
    runs once per frame and carries the motion, so the part run per position stays small; its receptive
    field, +-(1 + context_layers) positions, bounds the motion per frame. codes (B, H, W), context
    (B, F, H, W): int64 in [0, K); action (B,) in [0, A)."""
    def __init__(self, config: ActionConditionalPriorConfig):
        super().__init__()
        self.config = c = config
        self.num_embeddings, self.num_actions, self.context_frames = c.num_embeddings, c.num_actions, c.context_frames
        if c.embedding_dim:
            self.register_buffer("codebook", torch.zeros(c.num_embeddings, c.embedding_dim))
        else:
            self.code_embedding = nn.Embedding(c.num_embeddings, c.channels)
        self.action_embedding = nn.Embedding(c.num_actions, c.channels)
        width = c.context_frames * (c.embedding_dim or c.channels) + c.channels
        self.context = nn.Sequential(nn.Conv2d(width, c.context_channels, 3, padding=1),
                                     ResidualStack(c.context_channels, c.context_channels // 2, c.context_layers))
        self.pixelcnn = GatedPixelCNN(GatedPixelCNNConfig(c.num_embeddings, 1, c.channels, c.num_layers,
                                                          c.kernel_size, cond_channels=c.context_channels))

    def condition(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The conditioning map (B, context_channels, H, W) of the context frames and action."""
        _require(context.dim() == 4 and context.shape[1] == self.context_frames and not context.is_floating_point(),
                 f"context: expected an integer (B, {self.context_frames}, H, W) tensor of codes", context)
        _require(action.dim() == 1 and not action.is_floating_point() and len(action) == len(context),
                 f"action: expected an integer ({len(context)},) tensor, one id per example", action)
        _check_range(action, "action", self.num_actions)
        _check_range(context, "context", self.num_embeddings)
        embedded = (F.embedding(context.long(), self.codebook) if self.config.embedding_dim
                    else self.code_embedding(context.long()))
        frames = embedded.permute(0, 1, 4, 2, 3).flatten(1, 2)  # (B, F * width, H, W)
        act = self.action_embedding(action.long())[:, :, None, None].expand(-1, -1, *context.shape[2:])
        return self.context(torch.cat([frames, act], 1))

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Embed the context frames by the frame VQ-VAE's codebook (K, D), a fixed buffer (embedding_dim = D):
        the context network then reads z_q, where patches that look alike lie close, instead of learning an
        embedding of K arbitrary ids."""
        D = self.config.embedding_dim
        _require(D > 0 and codebook.shape == (self.num_embeddings, D),
                 f"codebook: expected a ({self.num_embeddings}, {D}) tensor (config.embedding_dim > 0)", codebook)
        self.codebook.copy_(codebook.detach())

    def forward(self, codes: torch.Tensor, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) of p(z_t+1,i | z_t+1,<i, context, action), teacher-forced."""
        return self.pixelcnn(codes, cond=self.condition(context, action))

    def log_prob(self, codes: torch.Tensor, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log p(z_t+1 | context, action) in nats, (B,)."""
        return self.pixelcnn.log_prob(codes, cond=self.condition(context, action))

    # ---- Not in the paper: guidance toward the action (classifier-free, as GatedPixelCNN.sample) ----
    @torch.no_grad()
    def sample(self, context: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0, guidance: float = 0.0) -> torch.Tensor:
        """Roll out T frames of codes (B, T, H, W) from the context (B, F, H, W) and actions (B, T): each
        sampled frame joins the context of the next; nothing is decoded. guidance = w > 0 draws each code
        from log p(z | a) + w (log p(z | a) - log p(z)), p(z) = the mean over actions a' of p(z | a'), the
        prior of an agent that picks each alike (classifier-free guidance without training of its own, see
        GatedPixelCNN.sample); it costs 1 + A passes per position instead of one."""
        _require(actions.dim() == 2 and actions.shape[0] == context.shape[0],
                 f"actions: expected a ({context.shape[0]}, T) tensor", actions)
        B, A, frames = len(context), self.num_actions, []
        every_action = torch.arange(A, device=actions.device).repeat_interleave(B)
        for t in range(actions.shape[1]):
            if guidance:   # each context with its action, then with each of the A actions
                cond = self.condition(context.repeat(1 + A, 1, 1, 1), torch.cat([actions[:, t], every_action]))
            else:
                cond = self.condition(context, actions[:, t])
            frames.append(self.pixelcnn.sample(tuple(context.shape[2:]), batch_size=len(cond), cond=cond,
                                               generator=generator, temperature=temperature, guidance=guidance,
                                               unconditioned=A))
            context = torch.cat([context[:, 1:], frames[-1][:, None]], 1)
        return torch.stack(frames, 1)


# =====================================================================================================
# Appendix: the argument checks behind every public entry point, and the rules the config fields follow.
# =====================================================================================================
class NonFiniteError(ValueError):
    """NaN or Inf where finite values are needed (z_e, the codebook, their distances, an EMA update)."""


def _require(ok, message: str, got=None, error=ValueError) -> None:
    """The argument check of every public entry point: error(message) unless ok. got: the tensor
    received (the message gives its shape and dtype) or a function giving the message's end on failure.
    A tensor `ok` (a check of values) is read at once in eager CPU code; on a GPU or under torch.compile it
    is an asynchronous assert, which never makes the host wait for the device and fails at the next sync."""
    if isinstance(ok, torch.Tensor) and (ok.device.type != "cpu" or torch.compiler.is_compiling()):
        torch._assert_async(ok, message)
    elif not ok:
        if isinstance(got, torch.Tensor):
            message += f"; got shape {tuple(got.shape)}, dtype {got.dtype}"
        raise error(message + (got() if callable(got) else ""))


def _check_range(x: torch.Tensor, name: str, count: int) -> None:
    """x must hold integers in [0, count): codes, class labels, speaker ids."""
    _require(not x.is_floating_point() and not x.is_complex(), f"{name}: expected an integer tensor", x)
    if x.numel():
        _require((x.min() >= 0) & (x.max() < count), f"{name}: values must lie in [0, {count})",
                 lambda: f"; got range [{int(x.min())}, {int(x.max())}]")


_COUNT = (lambda v: v is None or isinstance(v, int) and v >= 1, "an integer >= 1")
_RULES = {  # what config fields must hold, by name or owner.name; any other field: _COUNT
    "commitment_cost": (lambda v: 0 <= v < math.inf, ">= 0"),
    "decay": (lambda v: v is None or 0 < v < 1, "in (0, 1), or None for the codebook loss of Eq. 3 (decay=0 would "
                                                "replace the codebook by each batch's means)"),
    "dead_code_threshold": (lambda v: v is None or 0 < v < math.inf, "> 0 or None"),
    **dict.fromkeys(("epsilon", "data_variance"), (lambda v: 0 < v < math.inf, "> 0")),
    "likelihood": (lambda v: v in ("gaussian", "categorical"), "'gaussian' or 'categorical'"),
    "dims": (lambda v: v in (1, 2, 3), "1, 2 or 3"),
    "kernel_size": (lambda v: isinstance(v, int) and v >= 3 and v % 2 == 1, "odd and >= 3"),
    **dict.fromkeys(("kmeans_init", "channel_last"), (lambda v: isinstance(v, bool), "a bool")),
    **dict.fromkeys(("num_res_layers", "num_downsamples", "cond_channels",
                     "ActionConditionalPriorConfig.embedding_dim"), (lambda v: isinstance(v, int) and v >= 0, ">= 0")),
}


def _check_fields(owner: str, **fields) -> None:
    """ValueError naming the first field of `owner` that breaks its rule in _RULES."""
    for name, value in fields.items():
        test, expected = _RULES.get(f"{owner}.{name}", _RULES.get(name, _COUNT))
        _require(test(value), f"{owner}.{name}: expected {expected}; got {value!r}")


def _check_sample(prior: "GatedPixelCNN", shape, label, batch_size, temperature: float, guidance: float,
                  unconditioned: int) -> tuple[int, int]:
    """GatedPixelCNN.sample's arguments checked: (B, blocks), blocks = 1 + unconditioned with guidance."""
    _require(len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape),
             f"shape: expected (H, W), two integers > 0; got {shape!r}")
    B = batch_size if label is None else len(label)
    prior._check_label(label, B)
    _require(isinstance(B, int) and B > 0, f"{'batch_size' if label is None else 'label'}: expected a batch of "
             f"B > 0 (batch_size for a model without classes, else len(label)); got {B!r}")
    _require(math.isfinite(temperature) and temperature > 0,
             f"temperature: expected a finite number > 0; got {temperature}")
    _require(math.isfinite(guidance) and guidance >= 0, f"guidance: expected a finite number >= 0; got {guidance}")
    _require(not guidance or unconditioned >= 1, f"unconditioned: expected >= 1 blocks for guidance; got {unconditioned}")
    blocks = 1 + unconditioned if guidance else 1
    _require(B % blocks == 0, f"{'batch_size' if label is None else 'label'}: expected a batch of {blocks} blocks "
             f"for guidance (B conditioned rows, then {unconditioned} x B unconditioned); got {B}")
    return B, blocks
