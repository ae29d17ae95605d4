"""Error metrics used everywhere (tests, benchmarks, calibration): computed in float64."""

import torch


def rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``sum|x - ref| / sum|ref|``."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-300))


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors."""
    x, ref = x.detach().double().flatten(), ref.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(x, ref, dim=0, eps=1e-300))


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square error."""
    return float((x.detach().double() - ref.detach().double()).pow(2).mean().sqrt())


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of ``x`` against ``ref`` whose values span ``data_range`` (2 for [-1, 1])."""
    mse = (x.detach().double() - ref.detach().double()).pow(2).mean()
    return float(10 * torch.log10(data_range**2 / mse.clamp_min(1e-300)))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03).

    x, ref: [..., H, W] images (every leading index one image, e.g. [C, F, H, W] video channels and frames).
    """
    x = x.detach().double().reshape(-1, 1, *x.shape[-2:])
    ref = ref.detach().double().reshape(-1, 1, *ref.shape[-2:])
    coords = torch.arange(11, dtype=torch.float64, device=x.device) - 5
    gauss = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (gauss[:, None] * gauss[None, :] / gauss.sum() ** 2)[None, None]

    def blur(image: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(image, window)

    mu_x, mu_r = blur(x), blur(ref)
    var_x, var_r = blur(x * x) - mu_x**2, blur(ref * ref) - mu_r**2
    cov = blur(x * ref) - mu_x * mu_r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_r**2 + c1) * (var_x + var_r + c2))
    return float(index.mean())
