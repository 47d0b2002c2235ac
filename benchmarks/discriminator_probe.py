"""The head-only probe of docs/discriminator.md: train a fresh discriminator head alone on the frozen MNIST teacher's
features against a fixed generator, and print its accuracy and logit gap (real - fake) per log-sigma bin.

    python benchmarks/discriminator_probe.py FEATURE_MODULES [LR] [DM_INDEX_MAX] [UPDATES] [CLIP]
    python benchmarks/discriminator_probe.py mid_block 2e-4 980 60
    python benchmarks/discriminator_probe.py down_blocks.0.resnets.0,down_blocks.0,mid_block 1e-3 980 100

Environment: GEN=ckpt/generator.safetensors (a run's generator instead of the student at initialisation),
GN=<groups> (every GroupNorm of the heads with that many groups; GN=32 gives the old head on 64 channels),
NOGN=1 (heads without GroupNorm).
"""
import sys, time, json, math, torch, torch.nn.functional as F
from fdistill.pipelines.mnist import load_teacher, load_mnist
from fdistill.denoisers import EDMPrecondUNet, freeze
from fdistill.discriminator import Discriminator
from fdistill.noise import karras_sigmas
torch.manual_seed(0)
mods = sys.argv[1].split(",")
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 2e-4
imax = int(sys.argv[3]) if len(sys.argv) > 3 else 980
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 60
clip = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
den, meta = load_teacher()
teacher = freeze(EDMPrecondUNet(den.unet, 0.5, mods))
x_all, y_all = load_mnist()
sig = karras_sigmas()
with torch.no_grad():
    probe = teacher(torch.zeros(1,1,16,16), torch.ones(1), torch.zeros(1,dtype=torch.long), mode="features")
print("feature shapes", [tuple(f.shape[1:]) for f in probe])
disc = Discriminator.for_feature_shapes([f.shape[1:] for f in probe])
import os
if os.environ.get("NOGN"):
    for h in disc.heads:
        h.net = torch.nn.Sequential(*[m if not isinstance(m, torch.nn.GroupNorm) else torch.nn.Identity() for m in h.net])
if os.environ.get("GN"):
    g = int(os.environ["GN"])
    for h in disc.heads:
        h.net = torch.nn.Sequential(*[m if not isinstance(m, torch.nn.GroupNorm) else torch.nn.GroupNorm(g, m.num_channels) for m in h.net])
print(disc)
opt = torch.optim.AdamW(disc.parameters(), lr=lr, weight_decay=0.01)
G = None
if os.environ.get("GEN"):
    from fdistill.config import load_config
    from fdistill.pipelines import build_task
    from safetensors.torch import load_file
    task = build_task(load_config("configs/mnist.yaml", ["task.eval_samples=0"]), "cpu")
    G = task.generator
    sd = load_file(os.environ["GEN"])
    if any(k.startswith("module.") for k in sd):
        sd = {k[7:]: v for k, v in sd.items() if k.startswith("module.")}
    G.load_state_dict(sd); G.eval()
def gen(n, g):
    y = torch.randint(0, 10, (n,), generator=g)
    z = torch.randn(n,1,16,16, generator=g)
    with torch.no_grad():
        if G is not None:
            return G(z, y), y
        return teacher(80*z, torch.full((n,),80.), y).clamp(-3,3), y
def real(n, g):
    i = torch.randint(0, len(x_all), (n,), generator=g); return x_all[i], y_all[i]
g = torch.Generator().manual_seed(1)
B = 32
# held-out eval set per sigma bin (bins = log-sigma, 10 bins over [sig[20], sig[980]])
lo, hi = math.log(sig[20]), math.log(sig[980])
eval_sig = [math.exp(lo + (b + 0.5) / 10 * (hi - lo)) for b in range(10)]
ge = torch.Generator().manual_seed(99)
xf_e, yf_e = gen(256, ge); xr_e, yr_e = real(256, ge)
def evaluate():
    out = []
    with torch.no_grad():
        for s in eval_sig:
            sf = torch.full((256,), s)
            lf = disc(teacher(xf_e + s*torch.randn(xf_e.shape, generator=ge), sf, yf_e, mode="features"))
            lr_ = disc(teacher(xr_e + s*torch.randn(xr_e.shape, generator=ge), sf, yr_e, mode="features"))
            out.append((round(0.5*((lr_>0).float().mean()+(lf<0).float().mean()).item(), 2), round((lr_.mean()-lf.mean()).item(),1)))
    return out
t0 = time.time()
print("sigma bins", [round(s,3) for s in eval_sig])
for step in range(steps + 1):
    if step % 20 == 0:
        print(step, "acc per bin", evaluate(), f"{time.time()-t0:.0f}s", flush=True)
    if step == steps: break
    xf, yf = gen(B, g); xr, yr = real(B, g)
    sf = sig[torch.randint(20, imax+1, (B,), generator=g)]; sr = sig[torch.randint(20, imax+1, (B,), generator=g)]
    x = torch.cat([xf + sf.view(-1,1,1,1)*torch.randn(xf.shape, generator=g), xr + sr.view(-1,1,1,1)*torch.randn(xr.shape, generator=g)])
    with torch.no_grad():
        feats = teacher(x, torch.cat([sf, sr]), torch.cat([yf, yr]), mode="features")
    logit = disc(feats)
    loss = F.softplus(logit[:B]).mean() + F.softplus(-logit[B:]).mean()
    opt.zero_grad(); loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(disc.parameters(), clip if clip > 0 else float('inf'))
    opt.step()
    if step % 10 == 0:
        print(f"  step {step} loss {loss.item():.3f} gradnorm {gn.item():.2f} feat-std {[round(f.std().item(),2) for f in feats]}", flush=True)
