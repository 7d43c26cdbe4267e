"""Diffusion models as policies: a small DiT denoiser, noise schedules, and DDPM/DDIM samplers
whose steps are the Gaussian actions of the denoising MDP (D3PO, DDPO, Diffusion-DPO)."""
