"""corrclip: CorrCLIP's blocks against their equations on tiny random models (DINO q+k correlations
in merged regions, the spatial and semantic branches, the per-region vote), and end to end through
predict, eval, video and serve with a tiny EoMT from transformers as the region-mask generator.
(Beside the authors' own code on the same weights and masks it agreed to 1.9e-7 in the logits and
100% in the label maps: see the README.)"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLES
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from segcli.cli import app
from segcli.modeling.corrclip import correlation_weights, dbscan_min1, merge_regions, spatial_blocks
from segcli.models.clip_weights import clip_dense_from_clip_state

transformers = pytest.importorskip("transformers", reason="corrclip's region masks need the regions extra")


def tiny_models(layers: int = 6):
    torch.manual_seed(7)
    clip = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(image_size=64, patch_size=16, width=64, layers=layers, head_width=64),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=True).eval()
    from timm.models.vision_transformer import VisionTransformer

    dino = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_bias=True, num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    for p in [*dino.parameters(), *clip.visual.parameters()]:  # structure beyond timm's and open_clip's inits
        p.data += torch.randn_like(p) * 0.05
    return clip, dino


def tiny_eomt(folder: Path) -> Path:
    """A random EoMT saved as the hub has it, whose queries all score above 0.8 (class 0)."""
    torch.manual_seed(0)
    cfg = transformers.EomtConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  image_size=64, patch_size=16, num_queries=12, num_blocks=2, num_labels=5,
                                  num_register_tokens=1)
    model = transformers.EomtForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.copy_(torch.tensor([9.0, 0, 0, 0, 0, 0]))
    model.save_pretrained(folder, safe_serialization=True)
    transformers.EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corr_files(tmp_path_factory) -> str:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("corrclip")
    clip, dino = tiny_models()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(folder / "dino.safetensors"))
    tiny_eomt(folder / "eomt")
    return f"corrclip:{folder / 'open_clip_model.safetensors'},{folder / 'dino.safetensors'},{folder / 'eomt'}"


def test_dbscan_is_scikit_learns():
    # a chain 0-1-2 within eps links transitively, 3 alone, 4 has no neighbour at all (noise)
    d = np.array([[0, .1, .5, .9, .9], [.1, 0, .15, .9, .9], [.5, .15, 0, .9, .9], [.9, .9, .9, 0, .9],
                  [.9, .9, .9, .9, .3]])
    assert dbscan_min1(d, 0.2).tolist() == [0, 0, 0, 1, -1]
    sklearn = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    for n in (2, 7, 30):
        f = rng.normal(size=(n, 4)) + rng.integers(0, 3, size=(n, 1))
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        s = f @ f.T
        dist = s.max() - s
        for eps in (0.05, 0.2, 0.6):
            expected = sklearn.DBSCAN(eps=eps, min_samples=1, metric="precomputed").fit_predict(dist)
            assert dbscan_min1(dist, eps).tolist() == expected.tolist()


def test_merging_and_the_attention_scope_are_their_equations():
    ids = torch.tensor([[-1, -1, 0, 0], [1, 1, 2, 2], [3, 3, 2, 2]])
    f = torch.zeros(12, 3)
    f[:, 0] = 1.0  # regions 0 and 1 share a direction, region 2 another, region 3 a third
    f[ids.flatten() == 2] = torch.tensor([0.0, 1.0, 0.0])
    f[ids.flatten() == 3] = torch.tensor([0.0, 0.6, 0.8])
    merged = merge_regions(ids, f)
    assert merged[0, 0] == -1  # the smallest id (unsegmented) is never merged
    assert merged[0, 2] == merged[1, 0] == 10000 and merged[1, 2] == 10001 and merged[2, 0] == 10002
    assert torch.equal(merge_regions(ids.clamp(max=0), f), ids.clamp(max=0))  # two ids: nothing to merge
    flat = merged.flatten()
    s = f @ f.T
    w = correlation_weights(f, flat)
    outside = flat == -1
    allowed = ((flat[:, None] == flat[None]) & ~outside[:, None]) | ((outside[:, None] | outside[None]) & (s > s.mean()))
    expected = (4 * s).masked_fill(~allowed, -torch.inf).softmax(-1)
    assert torch.allclose(w, expected) and torch.all(w[~allowed] == 0)
    assert list(spatial_blocks(12)) == [5, 6, 7, 8, 9] and list(spatial_blocks(24)) == list(range(10, 22))


def test_corrclip_is_its_equations():
    """The three branches, with the region tokens run the authors' way: appended to the sequence
    and masked through open_clip's own blocks."""
    clip, dino = tiny_models()
    model = clip_dense_from_clip_state(clip.state_dict(), "tiny", method="corrclip", proxy_state=dino.state_dict())
    assert model.output_stride == 8 and model.capabilities.needs_regions and not model.capabilities.provides_embeddings
    images = torch.rand(2, 3, 64, 96)
    regions = torch.full((2, 64, 96), -1, dtype=torch.long)
    regions[0, :40, :50], regions[0, 30:, 60:], regions[1, 10:60, 20:90] = 0, 1, 4
    with torch.no_grad():
        got = model.pixel_embeddings(images, regions)  # [2,32,8,12]
        qk = model.proxy(images, query_key=True)
        v = clip.visual
        blocks = v.transformer.resblocks
        x0 = v.conv1((images - model.pixel_mean) / model.pixel_std).flatten(2).transpose(1, 2)
        x0 = v.ln_pre(torch.cat([v.class_embedding.expand(2, 1, -1), x0], 1) + model.position_embedding((4, 6)))
        for i in range(2):  # one window at a time, as the authors run them
            f = F.normalize(qk[i].flatten(1).T, dim=-1)  # [96,c]
            ids = F.interpolate(regions[i][None, None].float(), size=(8, 12), mode="nearest")[0, 0].long()
            merged = merge_regions(ids, f)
            weights = correlation_weights(f, merged.flatten())
            small = F.interpolate(merged[None, None].float(), size=(4, 6), mode="nearest")[0, 0].long().flatten()
            masks = torch.stack([small == r for r in torch.unique(small)])  # [R,24]
            r = len(masks)
            seq = torch.cat([x0[i:i + 1, :1].expand(1, r, -1), x0[i:i + 1]], 1)  # [1,R+1+24,w]
            allow = torch.zeros(seq.shape[1], seq.shape[1], dtype=torch.bool)
            allow[r:, r:] = True
            allow[:r, r] = True
            allow[:r, r + 1:] = masks
            blocked = torch.zeros(allow.shape).masked_fill(~allow, -torch.inf)  # open_clip casts masks to float
            spatial = []
            for index, block in enumerate(blocks[:-1]):
                seq = block(seq, attn_mask=blocked)
                if index in spatial_blocks(len(blocks)):
                    spatial.append(seq[:, r:])
            last = blocks[-1]
            tokens = last(seq, attn_mask=blocked)[0, :r]
            outs = []
            for t in (seq[:, r:], torch.stack(spatial).mean(0)):
                val = F.linear(last.ln_1(t), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1)[2][0, 1:]
                val = F.interpolate(val.T.reshape(1, -1, 4, 6), size=(8, 12), mode="bilinear")[0].flatten(1).T
                outs.append(v.ln_post(last.attn.out_proj(weights @ val)))
            up = F.interpolate(masks.float().reshape(1, r, 4, 6), size=(8, 12), mode="nearest")[0].flatten(1)
            semantic = v.ln_post(up.T @ tokens)
            expected = ((outs[0] + outs[1] + 0.5 * semantic) @ v.proj).T.reshape(32, 8, 12)
            assert torch.allclose(got[i], expected, atol=2e-5), (got[i] - expected).abs().max()


def test_the_vote_takes_each_regions_majority():
    from segcli.inference.regions import vote_in_regions

    logits = torch.zeros(3, 4, 5)
    labels = torch.tensor([[0, 0, 1, 2, 2], [1, 1, 1, 2, 0], [2, 2, 0, 0, 1], [2, 1, 0, 1, 1]])
    logits.scatter_(0, labels[None], 1.0)
    regions = torch.tensor([[-1, 5, 5, 5, 7], [-1, 5, 5, 7, 7], [6, 6, 6, 6, 7], [6, 6, 9, 9, 9]])
    out = vote_in_regions(logits, regions, (4, 5)).argmax(0)
    assert out[regions == -1].tolist() == labels[regions == -1].tolist()  # unsegmented: as it was
    assert set(out[regions == 5].tolist()) == {1} and set(out[regions == 7].tolist()) == {2}
    assert set(out[regions == 6].tolist()) == {2}  # 2,2,0,0 | 2,1: label 2 three times
    assert set(out[regions == 9].tolist()) == {1}  # 0,1,1
    # a tie goes to the smaller label (torch.mode's choice in the authors' code); synonyms vote as their label
    tie = vote_in_regions(logits[:, :1, 1:3], torch.tensor([[-1, 3]]).expand(1, 2).clone(), (1, 2))
    assert tie.argmax(0).tolist() == [[0, 1]]
    groups = np.array([0, 1, 1])  # channels 1 and 2 are one label
    out = vote_in_regions(logits, regions, (4, 5), groups).argmax(0)
    assert set(out[regions == 6].tolist()) == {1}  # 2,2,0,0,2,1 -> label 1 five times


def test_predict_eval_video_and_the_refusals(corr_files, tmp_path):
    from test_video import make_video

    from segcli.inference.segmenter import Segmenter
    from segcli.vocabulary.labels import parse_labels

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat.jpg", "rocket.jpg"):
        Image.open(SAMPLES / name).resize((150, 110)).save(photos / name)
    make_video(photos / "pan.mp4", frames=3, size=(96, 64))
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["predict", str(photos), "-m", corr_files, "-l", "cat,sky,grass", "-o", str(out),
                                   "-q", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 3 and summary["settings"]["protocol"] == {"short_side": 448, "window": 336, "stride": 112}
    mask = np.array(Image.open(out / "cat_mask.png"))
    assert mask.shape == (110, 150)
    # the API gives predict's mask, and every region the generator made holds one label (the vote)
    seg = Segmenter.from_pretrained(corr_files, device="cpu")
    [pred] = seg.predict([Image.open(photos / "cat.jpg")], labels="cat,sky,grass")
    assert np.array_equal(pred.label_map, mask)
    seg.model.region_generator.settings.update(overlap_mask_area_threshold=0.0)  # random masks overlap a lot
    pixels, hw = seg.runner.prepare_pixels(Image.open(photos / "cat.jpg").convert("RGB"))
    [regions] = seg.runner.region_maps([pixels], [hw])
    assert len(torch.unique(regions)) > 2
    [logits] = seg.runner.segment_images([pixels], seg.label_embeddings(parse_labels("cat,sky,grass")), regions=[regions])
    voted = seg.runner.finish_logits(logits, pixels, hw, None, regions)[0].argmax(0)
    for r in torch.unique(regions)[1:]:
        assert len(torch.unique(voted[regions == r])) == 1
    frames = sorted((out / "pan_masks").iterdir())  # the video: one mask per frame, at its size
    assert len(frames) == 3 and np.array(Image.open(frames[0])).shape == (64, 96)
    stored = CliRunner().invoke(app, ["predict", str(photos / "cat.jpg"), "-m", corr_files, "-l", "cat,sky",
                                      "-o", str(tmp_path / "s"), "--window", "0", "--save", "mask,embeddings"])
    lines = stored.stderr.strip().splitlines()
    assert stored.exit_code == 2 and len(lines) == 1 and "region masks" in lines[0]
    from segcli.datasets.segmentation import limited, open_dataset
    from segcli.evaluation.evaluate import evaluate

    data = limited(open_dataset("synthetic"), "val", 2)
    metrics = evaluate(seg, data, labels=data.classes, batch_size=2)
    assert metrics["images"] > 0 and 0.0 <= metrics["mIoU"] <= 1.0
    with pytest.raises(Exception, match="corrclip votes"):
        evaluate(seg, data, labels=data.classes, ms_flip=True)


def test_info_names_all_three_models_without_downloading():
    from segcli.models.factory import describe_model, resolve_model

    spec = resolve_model("corrclip")
    assert spec.downloads and spec.metadata["pretrained"] == "metaclip_fullcc" and spec.architecture == "ViT-B-16-quickgelu"
    data = describe_model("corrclip:ViT-B-16@openai+mask2former")
    assert "vit_base_patch8_224.dino" in data["proxy weights"]
    assert data["region masks"].startswith("mask2former: https://huggingface.co/facebook/mask2former-swin-large-coco-panoptic")
    assert "downloaded on first use" in data["region masks"]
    assert describe_model("corrclip+sam2")["region masks"].startswith("sam2: https://huggingface.co/facebook/sam2-hiera-large")


def test_unreachable_generator_is_one_line(corr_files, tmp_path):
    clip_file, dino_file, _ = corr_files.split(":", 1)[1].split(",")
    run = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-m", f"corrclip:{clip_file},{dino_file}",
                                   "-l", "cat,sky", "-o", str(tmp_path / "o"), "-q"])
    lines = run.stderr.strip().splitlines()
    assert run.exit_code == 2 and len(lines) == 1 and "eomt region-mask model" in lines[0]


def tiny_sam2(folder: Path) -> Path:
    """A random SAM 2 of 0.8 M parameters (Hiera's block layout, narrow), saved as the hub has it."""
    torch.manual_seed(0)
    backbone = transformers.Sam2HieraDetConfig(hidden_size=16, embed_dim_per_stage=[16, 32, 64, 128],
                                               num_attention_heads_per_stage=[1, 1, 1, 1])
    vision = transformers.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[128, 64, 32, 16],
                                           fpn_hidden_size=32)
    cfg = transformers.Sam2Config(vision_config=vision.to_dict(), prompt_encoder_config={"hidden_size": 32},
                                  mask_decoder_config={"hidden_size": 32, "iou_head_hidden_dim": 32,
                                                       "num_attention_heads": 2, "mlp_dim": 64})
    transformers.Sam2Model(cfg).eval().save_pretrained(folder, safe_serialization=True)
    transformers.Sam2ImageProcessor().save_pretrained(folder)
    return folder


def test_sam2_masks_lie_smallest_first_and_drive_corrclip(corr_files, tmp_path):
    from segcli.inference.segmenter import Segmenter
    from segcli.modeling.regions import RegionGenerator

    folder = tiny_sam2(tmp_path / "sam2")
    generator = RegionGenerator.from_folder(folder)
    assert generator.kind == "sam2" and generator.settings["points_per_crop"] == 8
    generator.settings.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)  # random scores are low
    photo = torch.from_numpy(np.array(Image.open(SAMPLES / "cat.jpg").convert("RGB").resize((120, 90))))
    ids = generator(photo)
    assert ids.shape == (90, 120) and ids.dtype == torch.int64 and int(ids.min()) >= 0
    clip_file, dino_file, _ = corr_files.split(":", 1)[1].split(",")
    seg = Segmenter.from_pretrained(f"corrclip:{clip_file},{dino_file},{folder}", device="cpu")
    assert seg.model.region_generator.kind == "sam2"
    [pred] = seg.predict([Image.open(SAMPLES / "cat.jpg").resize((120, 90))], labels="cat,sky")
    assert pred.label_map.shape == (90, 120)


def test_the_server_gives_predicts_corrclip_mask(corr_files, tmp_path):
    pytest.importorskip("fastapi", reason="segcli serve needs the serve extra")
    from test_serve import Server

    photo = tmp_path / "cat.jpg"
    Image.open(SAMPLES / "cat.jpg").resize((150, 110)).save(photo)
    out = tmp_path / "predict"
    run = CliRunner().invoke(app, ["predict", str(photo), "-m", corr_files, "-l", "cat,sky,grass", "-o", str(out),
                                   "--save", "mask", "-q"])
    assert run.exit_code == 0, run.output
    server = Server(corr_files)
    try:
        status, _, body = server.segment(photo.read_bytes(), "mask", labels="cat,sky,grass")
    finally:
        server.stop()
    assert status == 200 and body == (out / "cat_mask.png").read_bytes()
