"""DoRA — Discover and tRAck (Venkataramanan et al., "Is ImageNet worth 1 video? Learning strong image encoders from
1 long unlabelled video", ICLR 2024, https://arxiv.org/abs/2310.08584).

DINO (raysl.methods.dino) on video clips. The teacher sees each frame of a clip unmasked. On the clip's first frame,
k randomly chosen heads of its last block find k objects, which are tracked into every frame by cross-attention
(raysl.methods.dora_track). The student sees each frame k times, each time with only one object's pixels kept
(the rest zeroed after normalisation, the mean colour, as the authors' code does), plus `local_crops` local crops
per frame. Loss per frame: ½·(mean over objects of CE(teacher, student masked view) + mean over local crops of
CE(teacher, student local crop)), with DINO's centring and temperatures; averaged over frames and clips.

The clip views (one crop and flip per clip, colour per frame) are made by Ray Data (raysl.data.clip_views); the
masks are made on the training worker, since they depend on the teacher's weights. The registered encoder is the
teacher's backbone, a ViT with a class token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysl.config import PretrainConfig
from raysl.config_ssl import DoRAConfig
from raysl.data.clip_views import ClipViews
from raysl.data.views import normalize
from raysl.methods.base import BatchFn, method_config, register
from raysl.methods.dino import DINO, local_size, mean_entropy
from raysl.methods.dora_track import discover, last_block_parts, pixel_masks, random_heads, track

LOCAL_SHARE = 112 / 224  # the authors' local crops: 112 px beside 224-px frames


def cross_entropy(target: torch.Tensor, logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over rows of −Σ target · log softmax(logits / temp); `target` (R, K) broadcasts over `logits`' middle
    axis (R, V, K)."""
    return -(target.unsqueeze(1) * F.log_softmax(logits.float() / temp, dim=-1)).sum(dim=-1).mean()


@register
class DoRA(DINO):
    name = "dora"
    batch_columns = ("clip", "locals")
    video_only = True

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        m = method_config(cfg, DoRAConfig)
        self.objects, self.iters, self.eps = m.objects, m.sinkhorn_iters, m.sinkhorn_eps
        self.seed = cfg.train.seed
        vit = self.teacher_backbone
        if not hasattr(vit, "patch_embed") or getattr(vit, "cls_token", None) is None:
            raise ValueError(f"model.backbone: DoRA tracks objects with a ViT's [CLS] attention; {cfg.model.backbone!r}"
                             " is not a timm ViT with a class token (e.g. vit_small_patch16_224)")
        heads = int(vit.blocks[-1].attn.num_heads)  # type: ignore[index,union-attr]
        if self.objects > heads:
            raise ValueError(f"method.objects: {self.objects} is more than the {heads} heads of the last block of "
                             f"{cfg.model.backbone!r}; allowed: 1 to {heads}")
        self.heads = heads
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)  # type: ignore[union-attr,arg-type,assignment]

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        super().check_config(cfg)
        if cfg.data.frames_per_clip < 1:
            raise ValueError("data.frames_per_clip: DoRA needs at least 1 frame per clip")

    @classmethod
    def local_size(cls, cfg: PretrainConfig) -> int:
        return local_size(cfg, LOCAL_SHARE)

    @classmethod
    def view_transform(cls, cfg: PretrainConfig) -> BatchFn:
        m = method_config(cfg, DoRAConfig)
        return ClipViews(cfg.model.image_size, cls.local_size(cfg), m.local_crops, global_scale=m.global_scale,
                         local_scale=m.local_scale, flip_p=m.flip_p, jitter=m.jitter, jitter_p=m.jitter_p,
                         gray_p=m.gray_p, blur_p=m.blur_p,
                         frames=cfg.data.frames_per_clip)

    @torch.no_grad()
    def teacher_masks(self, x: torch.Tensor, clips: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher logits (B·T, K), pixel masks (B, T, k, 1, S, S)) for normalised frames x (B·T, 3, S, S)."""
        parts = last_block_parts(self.teacher_backbone, x)
        frames = len(x) // clips
        n, d = parts.keys.shape[1:]
        anchor = parts.first_frames(clips)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps_done)  # a resumed run draws the same
        heads = random_heads(self.heads, self.objects, gen).to(x.device)
        prototypes = discover(anchor, heads, self.iters, self.eps)
        masks = track(prototypes, parts.keys.view(clips, frames, n, d))
        return self.teacher_head(parts.cls), pixel_masks(masks, self.grid, x.shape[-1], dtype=x.dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        clip, local = batch["clip"], batch["locals"]  # (B, T, 3, S, S), (B, T, L, 3, s, s) uint8
        b, t = clip.shape[:2]
        x = normalize(clip.flatten(0, 1), self.mean, self.std)
        teacher, masks = self.teacher_masks(x, b)
        k = masks.shape[2]
        masked = (x.view(b, t, 1, *x.shape[1:]) * masks).flatten(0, 2)  # (B·T·k, 3, S, S): one object each
        student_masked = self.head(self.backbone(masked)).view(b * t, k, -1)
        temp = self.temperature()
        target = F.softmax((teacher.float() - self.loss_fn.center) / temp, dim=-1)
        loss = cross_entropy(target, student_masked, self.loss_fn.student_temp)
        if local.shape[2]:
            flat = normalize(local.flatten(0, 2), self.mean, self.std)
            student_local = self.head(self.backbone(flat)).view(b * t, local.shape[2], -1)
            loss = 0.5 * (loss + cross_entropy(target, student_local, self.loss_fn.student_temp))
        with torch.no_grad():
            t_entropy = mean_entropy((teacher.float() - self.loss_fn.center) / temp)
            s_entropy = mean_entropy(student_masked.detach().float() / self.loss_fn.student_temp)
        self.loss_fn.update_center([teacher])  # after the loss: this step's targets used the previous centre
        return {"loss": loss, "teacher_temp": loss.new_tensor(temp), "teacher_entropy": t_entropy,
                "student_entropy": s_entropy, "mask_fraction": masks.float().mean()}

