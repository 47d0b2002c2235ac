"""The diffusers classes of an exported EDM one-step generator: ``OneStepPipeline`` and its
``EDMOneStepScheduler`` (``fdistill export`` writes them; ``from_pretrained`` reads them back). A few-step
student's scheduler carries its k noise levels (``sigmas``); the pipeline then samples in k evaluations.

This module imports diffusers; the rest of the package imports it only where a pipeline is made or loaded.
Folders exported before these classes had their own module name ``fdistill.export`` as their library;
``fdistill.export`` re-exports them, so both load.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin  # noqa: F401
from diffusers.configuration_utils import ConfigMixin, register_to_config
from PIL import Image

from .denoisers import EDMPrecondUNet
from .generator import OneStepGenerator
from .imageio import to_uint8
from .sampler import per_image_latents, per_image_random_labels
from .student import per_image_renoise

# ModelMixin is imported for diffusers' loader: it looks a component's base classes up in the component's module.

class EDMOneStepScheduler(SchedulerMixin, ConfigMixin):
    """The preconditioning of a one-step EDM generator (there is no schedule: one step at ``sigma_max``).

    x = D(sigma_max z, sigma_max, y), with D(x, s, y) = c_skip x + c_out F(c_in x, log(s)/4, y),
    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), sd = sigma_data.

    A few-step student's ``sigmas`` are its k levels (sigmas[0] = sigma_max): x^(j) = D(x_t^(j), sigmas[j], y),
    then x_t^(j+1) = x^(j) + sigmas[j+1] eps_j with fresh noise (``fdistill.student``). None: one step."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, sigma_max: float = 80.0, sigma_data: float = 0.5, precond: str = "edm",
                 sigmas: list | None = None):
        if precond != "edm":
            raise ValueError(f"EDMOneStepScheduler: unsupported preconditioning {precond!r} (only 'edm')")
        if sigmas is not None and (not sigmas or abs(float(sigmas[0]) - float(sigma_max)) > 1e-6 * sigma_max):
            raise ValueError(f"EDMOneStepScheduler: sigmas[0] must be sigma_max ({sigma_max}), got {sigmas}")

    @property
    def stage_sigmas(self) -> list[float]:
        """The generator's noise levels, one per network evaluation."""
        s = self.config.sigmas
        return [float(self.config.sigma_max)] + [float(v) for v in s[1:]] if s else [float(self.config.sigma_max)]

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config.sigma_max)

class OneStepPipeline(DiffusionPipeline):
    """One-step sampling from a distilled EDM generator (``fdistill export``)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds or 0)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def num_steps(self) -> int:
        """Network evaluations per image (1, or a few-step student's k)."""
        return len(self.scheduler.stage_sigmas)

    def generator_module(self):
        """The pipeline's UNet (shared, not copied) as the package's OneStepGenerator (k-step if the scheduler
        has k levels)."""
        c = self.scheduler.config
        gen = OneStepGenerator(EDMPrecondUNet(self.unet, float(c.sigma_data), ()), float(c.sigma_max),
                               self.latent_shape)
        gen.set_stages(self.scheduler.stage_sigmas)
        return gen

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images: int | None = None, seeds=None, generator=None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """Generate images in one network evaluation (a few-step student: ``num_steps`` evaluations).

        Latents: ``seeds`` (one ``torch.Generator().manual_seed(seed)`` per image, as ``fdistill sample``:
        the same seed gives the same image whatever the batch), else ``latents`` [N, C, H, W], else
        ``num_images`` draws from ``generator`` (one torch.Generator, or a list with one per image).
        A few-step student's re-noising noise: with ``seeds``, from each image's stream seeded seed + 2**32;
        else from ``generator`` (each image's, after its latent and label), else from torch's global stream.
        ``class_labels``: an int, a list or a tensor of N ints (class-conditional models). None draws them:
        with ``seeds``, from each seed's generator after its latent (EDM's generate.py), else from
        ``generator``. ``output_type``: 'pil', 'np' (float [0, 1] NHWC), 'pt' (float [0, 1] NCHW) or 'raw'
        (the generator's output, float [-1, 1] NCHW, unclamped)."""
        if output_type not in ("pil", "np", "pt", "raw"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'raw', got {output_type!r}")
        shape, k = self.latent_shape, self.num_classes
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            latents = per_image_latents(seeds, shape)
        elif latents is None:
            if isinstance(generator, (list, tuple)):
                latents = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
            else:
                n = num_images or (len(class_labels) if isinstance(class_labels, (list, tuple, torch.Tensor))
                                   else 1)
                dev = generator.device if generator is not None else "cpu"
                latents = torch.randn((n, *shape), generator=generator, device=dev)
        n = latents.shape[0]
        if num_images is not None and num_images != n:
            raise ValueError(f"num_images={num_images} but there are {n} latents/seeds")
        if tuple(latents.shape[1:]) != shape:
            raise ValueError(f"latents must have shape [N, {', '.join(map(str, shape))}], got "
                             f"{list(latents.shape)}")
        if k == 0:
            if class_labels is not None:
                raise ValueError("this generator is unconditional: leave class_labels=None")
            labels = None
        elif class_labels is None:
            if seeds is not None:
                labels = per_image_random_labels(seeds, shape, k)
            elif isinstance(generator, (list, tuple)):  # each image's generator, after its latent
                labels = torch.stack([torch.randint(0, k, (), generator=g, device=g.device) for g in generator])
            else:
                g = generator if isinstance(generator, torch.Generator) else None
                labels = torch.randint(0, k, (n,), generator=g, device=g.device if g is not None else "cpu")
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(n)
            if labels.numel() != n:
                raise ValueError(f"{labels.numel()} class labels for {n} images")
            if bool(((labels < 0) | (labels >= k)).any()):
                bad = labels[(labels < 0) | (labels >= k)].tolist()
                raise ValueError(f"class labels must lie in [0, {k}), got {bad[:5]}")
        dev = self.unet.device
        steps = self.num_steps
        noise = None
        if steps > 1:
            if seeds is not None:
                noise = per_image_renoise(seeds, shape, steps, dev)
            elif isinstance(generator, (list, tuple)):
                per = [[torch.randn(shape, generator=g, device=g.device) for _ in range(steps - 1)]
                       for g in generator]
                noise = [torch.stack([p[j] for p in per]).to(dev) for j in range(steps - 1)]
            elif isinstance(generator, torch.Generator):
                noise = generator
        x = self.generator_module()(latents.to(dev, torch.float32),
                                    None if labels is None else labels.to(dev), noise=noise).float()
        if output_type == "raw":
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)  # diffusers' [0, 1] convention
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                u8 = to_uint8(x).numpy()
                images = [Image.fromarray(a[:, :, 0] if a.shape[-1] == 1 else a) for a in u8]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

