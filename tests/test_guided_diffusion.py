"""Converting guided-diffusion checkpoints (cellflow.guided_diffusion) against guided-diffusion's
own modules (guided-diffusion-sdk, a test-only extra): random weights at 32 px, tiny widths,
float32; the converted models must compute what the originals compute."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from benchmarks.adm_reference import perturb, reference_unet
from cellflow.checkpoint import file_sha256
from cellflow.classifier import NoiseAwareClassifier, class_log_prob_gradient
from cellflow.diffusion import predict_epsilon
from cellflow.guided_diffusion import (
    CheckpointError,
    GuidedDiffusionError,
    convert_classifier,
    convert_unet,
    load_checkpoint,
    noise_schedule,
    parse_classifier_flags,
    parse_unet_flags,
    write_converted,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp decorators
    from guided_diffusion import unet as adm
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule

# 32 px, widths 32/64/64, attention at 16 and 8 px with 16-channel heads (2 and 4 heads).
UNET_FLAGS = ("--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 1 "
              "--attention_resolutions 16,8 --num_head_channels 16 --class_cond True "
              "--resblock_updown True --use_scale_shift_norm True")
CLASSIFIER_FLAGS = ("--image_size 32 --classifier_width 32 --classifier_channel_mult 1,2,2 "
                    "--classifier_depth 1 --classifier_attention_resolutions 16,8 "
                    "--classifier_num_head_channels 16")
# guided-diffusion's README, verbatim (the public class-conditional ImageNet models)
PUBLIC_64 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
             "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
             "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
             "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True")
PUBLIC_128 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
              "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
              "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
              "--use_scale_shift_norm True")
PUBLIC_256 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
              "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
              "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
              "--use_scale_shift_norm True")
TIMESTEPS = torch.tensor([0, 500, 999])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: a second intra-op thread only spins, and on a shared 2-core
    machine a spinning pool makes the file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_classifier(pool: str, classes: int, new_order: bool = False, image_size: int = 32,
                         seed: int = 0) -> torch.nn.Module:
    """guided-diffusion's EncoderUNetModel as create_classifier builds it, at CLASSIFIER_FLAGS
    (create_classifier itself knows no 32 px multipliers)."""
    torch.manual_seed(seed)
    model = adm.EncoderUNetModel(
        image_size=image_size, in_channels=3, model_channels=32, out_channels=classes,
        num_res_blocks=1, attention_resolutions=(image_size // 16, image_size // 8),
        channel_mult=(1, 2, 2), num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, pool=pool, use_new_attention_order=new_order)
    return perturb(model, seed)


def inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def eps_difference(reference, ours, labels_ours, labels_theirs, size: int = 32,
                   timesteps: torch.Tensor = TIMESTEPS) -> float:
    """Largest |eps| difference over ``timesteps``, each with one batch of images."""
    worst = 0.0
    for t in timesteps:
        x = torch.randn(len(labels_ours), 3, size, size,
                        generator=torch.Generator().manual_seed(int(t)))
        steps = t.repeat(len(x))
        theirs = reference(x, steps, labels_theirs)[:, :3]
        mine = predict_epsilon(ours, x, steps, labels_ours)
        assert theirs.abs().max() > 0.1  # not trivially zero
        worst = max(worst, float((theirs - mine).abs().max()))
    return worst


@pytest.mark.parametrize(("order", "classes", "learn_sigma"),
                         [("legacy", 2, False), ("legacy", 3, True),
                          ("new", 2, True), ("new", 3, False)])
def test_the_converted_unet_predicts_guided_diffusions_epsilon(order, classes, learn_sigma):
    flags = (f"{UNET_FLAGS} --learn_sigma {learn_sigma} "
             f"--use_new_attention_order {order == 'new'}")
    reference = reference_unet(flags, classes)
    names = [f"class{i}" for i in range(classes)]
    unet, report = convert_unet(reference.state_dict(), flags, names)
    assert isinstance(unet, UNet2DModel)
    assert unet.config.out_channels == (6 if learn_sigma else 3)
    assert report["qkv_order"] == order and report["qkv_order_source"].startswith("from")
    assert report["keys"]["checkpoint"] == report["keys"]["used"] == len(reference.state_dict())
    labels = torch.arange(classes).repeat(2)[:4]
    assert eps_difference(reference, unet, labels, labels) < 1e-5
    # the order matters: read the other way, the same weights compute something else
    other = {"legacy": "new", "new": "legacy"}[order]
    wrong, report = convert_unet(reference.state_dict(), flags, names, qkv_order=other)
    assert report["qkv_order"] == other and report["qkv_order_source"] == "given"
    assert eps_difference(reference, wrong, labels, labels, timesteps=TIMESTEPS[1:2]) > 1e-3


@pytest.mark.parametrize("layout", [
    "--resblock_updown False",  # improved-diffusion: strided-conv down, conv up
    "--use_scale_shift_norm False",
    "--resblock_updown False --use_scale_shift_norm False --num_head_channels -1 --num_heads 2",
])
def test_other_adm_layouts_convert_exactly(layout):
    """Not what build_unet makes, but UNet2DModel has the matching settings (num_heads 2 at
    the attended width 64 is one 32-channel head size everywhere)."""
    flags = f"{UNET_FLAGS} {layout}"
    reference = reference_unet(flags, 2)
    unet, report = convert_unet(reference.state_dict(), flags, ["a", "b"])
    assert report["architecture"]["built_by"] == "UNet2DModel"
    labels = torch.tensor([0, 1])
    assert eps_difference(reference, unet, labels, labels) < 1e-5


def test_the_public_64px_layout_converts_at_a_small_width():
    """OpenAI's 64x64 model (new qkv order, 3 ResBlocks a level, cosine schedule): its README
    flags with the width cut to 32 and the heads to 32 channels (widths 32, 64, 96, 128: 2, 3
    and 4 heads where attended)."""
    flags = PUBLIC_64 + " --num_channels 32 --num_head_channels 32"
    reference = reference_unet(flags, 2)
    unet, report = convert_unet(reference.state_dict(), flags, ["a", "b"])
    assert report["qkv_order"] == "new"
    assert report["architecture"]["built_by"] == "cellflow.diffusion.build_unet"
    assert report["noise_schedule"]["beta_schedule"] == "squaredcos_cap_v2"
    with torch.no_grad():
        x, t, y = torch.randn(1, 3, 64, 64), torch.tensor([250]), torch.tensor([1])
        assert torch.allclose(predict_epsilon(unet, x, t, y), reference(x, t, y)[:, :3],
                              atol=1e-5)


def test_the_public_256px_layout_accounts_for_every_key():
    """OpenAI's 256x256 model's layout (legacy qkv order), width cut to 32; its 1000 ImageNet
    rows are not our 2 classes (a clear error), 2 rows convert."""
    flags = PUBLIC_256 + " --num_channels 32"
    reference = reference_unet(flags, 1000)
    state = reference.state_dict()
    with pytest.raises(GuidedDiffusionError, match=r"1000 classes .* but 2 classes were given"):
        convert_unet(state, flags, ["a", "b"])
    state["label_emb.weight"] = state["label_emb.weight"][:2]
    unet, report = convert_unet(state, flags, ["a", "b"])
    assert report["qkv_order"] == "legacy"
    assert report["architecture"]["block_out_channels"] == [32, 32, 64, 64, 128, 128]
    assert report["architecture"]["attention_levels"] == [3, 4, 5]
    assert sum(p.numel() for p in unet.parameters()) == (
        sum(p.numel() for p in reference.parameters()) - 998 * 128)


def test_the_public_128px_layout_is_refused_with_its_reason():
    with pytest.raises(GuidedDiffusionError, match=r"--num_heads 4 .* 128, 192 and 256 channels"):
        convert_unet({}, PUBLIC_128, ["a", "b"])


@pytest.mark.parametrize("pool", ["attention", "adaptive"])
@pytest.mark.parametrize("order", ["legacy", "new"])
def test_the_converted_classifier_gives_guided_diffusions_logits_and_gradient(pool, order):
    reference = reference_classifier(pool, 3, new_order=order == "new")
    classifier, report = convert_classifier(
        reference.state_dict(), f"{CLASSIFIER_FLAGS} --classifier_pool {pool}", ["a", "b", "c"],
        qkv_order=None if order == "legacy" else "new")
    assert isinstance(classifier, NoiseAwareClassifier)
    assert classifier.config.pool == ("attention" if pool == "attention" else "mean")
    assert report["qkv_order"] == order
    assert report["attention_pool_qkv_order"] == ("new" if pool == "attention" else None)
    x, labels = inputs(4), torch.tensor([0, 1, 2, 1])
    for t in TIMESTEPS:
        steps = t.repeat(4)
        with torch.no_grad():
            theirs, mine = reference(x, steps), classifier(x, steps)
        assert theirs.std() > 0.01  # a head that is not zero
        assert (theirs - mine).abs().max() < 1e-5
        x_in = x.clone().requires_grad_(True)
        chosen = torch.log_softmax(reference(x_in, steps), -1).gather(1, labels[:, None]).sum()
        (expected,) = torch.autograd.grad(chosen, x_in)
        gradient = class_log_prob_gradient(classifier, x, steps, labels)
        assert expected.abs().max() > 1e-4
        assert (expected - gradient).abs().max() < 1e-5


def test_unet_labels_follow_our_class_order():
    """guided-diffusion numbered the classes by sorted name: normal 0, stroma 1, tumor 2."""
    reference = reference_unet(UNET_FLAGS, 3)
    ours = ["tumor", "normal", "stroma"]
    unet, report = convert_unet(reference.state_dict(), UNET_FLAGS, ours)
    assert report["checkpoint_classes"] == ["normal", "stroma", "tumor"]
    assert report["permuted"]
    assert [row["checkpoint_label"] for row in report["class_mapping"]] == [2, 0, 1]
    labels = torch.tensor([0, 1, 2])  # tumor, normal, stroma
    assert eps_difference(reference, unet, labels, torch.tensor([2, 0, 1])) < 1e-5
    moved = eps_difference(reference, unet, labels, labels, timesteps=TIMESTEPS[1:2])
    assert moved > 1e-3  # the rows did move
    # a checkpoint with its own order, named explicitly
    unet, report = convert_unet(reference.state_dict(), UNET_FLAGS, ours,
                                checkpoint_classes=["stroma", "tumor", "normal"])
    assert eps_difference(reference, unet, labels, torch.tensor([1, 2, 0]),
                          timesteps=TIMESTEPS[1:2]) < 1e-5
    unet, report = convert_unet(reference.state_dict(), UNET_FLAGS, ["normal", "stroma", "tumor"])
    assert not report["permuted"]


@pytest.mark.parametrize("pool", ["attention", "adaptive"])
def test_classifier_logits_follow_our_class_order(pool):
    reference = reference_classifier(pool, 3)
    classifier, _ = convert_classifier(reference.state_dict(),
                                       f"{CLASSIFIER_FLAGS} --classifier_pool {pool}",
                                       ["tumor", "normal", "stroma"])
    x, t = inputs(2), torch.tensor([100, 600])
    with torch.no_grad():
        theirs, mine = reference(x, t), classifier(x, t)
    assert (mine - theirs[:, [2, 0, 1]]).abs().max() < 1e-5
    assert (mine - theirs).abs().max() > 1e-3


def test_wrong_architecture_flags_name_the_keys():
    reference = reference_unet(UNET_FLAGS, 2)
    with pytest.raises(GuidedDiffusionError) as caught:
        convert_unet(reference.state_dict(), UNET_FLAGS.replace("--num_res_blocks 1",
                                                                "--num_res_blocks 2"), ["a", "b"])
    message = str(caught.value)
    assert "missing keys: " in message and "(118 in all)" in message
    assert "input_blocks.6.0.in_layers.0.weight" in message  # a block the checkpoint lacks
    # where the checkpoint's attention and skip connections sit, ours has none
    assert "unexpected keys: input_blocks.3.0.skip_connection.weight" in message
    assert "input_blocks.3.0.in_layers.2.weight (checkpoint (64, 32, 3, 3), expected " in message
    with pytest.raises(GuidedDiffusionError) as caught:
        convert_unet(reference.state_dict(), UNET_FLAGS.replace("--num_channels 32",
                                                                "--num_channels 64"), ["a", "b"])
    assert ("conv_in" not in str(caught.value)
            and "input_blocks.0.0.weight (checkpoint (32, 3, 3, 3), expected (64, 3, 3, 3))"
            in str(caught.value))
    wider = reference_unet(UNET_FLAGS.replace("--num_res_blocks 1", "--num_res_blocks 2"), 2)
    with pytest.raises(GuidedDiffusionError, match=r"unexpected keys: .*input_blocks\.6\.0"):
        convert_unet(wider.state_dict(), UNET_FLAGS, ["a", "b"])


def test_a_checkpoint_for_another_resolution_is_refused():
    flags_64 = UNET_FLAGS.replace("--image_size 32", "--image_size 64")
    reference = reference_unet(flags_64, 2)  # attention at 16 px: level 2 only
    with pytest.raises(GuidedDiffusionError,
                       match=r"another image_size.*missing keys: input_blocks\.3\.1\.norm\.weight"):
        convert_unet(reference.state_dict(), UNET_FLAGS, ["a", "b"])
    classifier = reference_classifier("attention", 2, image_size=64)
    with pytest.raises(GuidedDiffusionError, match=r"16x16 features .* 64 px images .* "
                                                   r"--image_size 32"):
        convert_classifier(classifier.state_dict(), CLASSIFIER_FLAGS, ["a", "b"])


def test_a_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2), "args": Opaque()}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt holds Python objects, not a plain "
                                              r"state dict.*never unpickles code"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2), "step": 3}, path)  # loadable, but not tensors
    with pytest.raises(CheckpointError, match=r"'step' holds a int"):
        load_checkpoint(path)
    torch.save({"state_dict": {"weights": torch.ones(2)}}, path)
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(2))


class Opaque:
    """Something only unpickling code could rebuild."""


def test_class_count_and_names_must_match():
    reference = reference_unet(UNET_FLAGS, 3)
    with pytest.raises(GuidedDiffusionError,
                       match=r"has 3 classes \(label_emb\.weight has 3 rows\) but 2 classes"):
        convert_unet(reference.state_dict(), UNET_FLAGS, ["a", "b"])
    with pytest.raises(GuidedDiffusionError, match=r"class 'c' is not among checkpoint_classes"):
        convert_unet(reference.state_dict(), UNET_FLAGS, ["a", "b", "c"],
                     checkpoint_classes=["a", "b", "x"])
    classifier = reference_classifier("adaptive", 3)
    with pytest.raises(GuidedDiffusionError, match=r"has 3 classes \(out\.3\.weight has 3 rows\)"
                                                   r" but 4 classes"):
        convert_classifier(classifier.state_dict(),
                           f"{CLASSIFIER_FLAGS} --classifier_pool adaptive", list("abcd"))


def test_flags_parse_as_guided_diffusion_reads_them():
    flags = parse_unet_flags(PUBLIC_64)
    assert (flags.image_size, flags.num_channels, flags.num_res_blocks) == (64, 192, 3)
    assert flags.use_new_attention_order is True and flags.dropout == 0.1
    assert flags.num_heads == 4 and flags.channel_mult == ""  # guided-diffusion's defaults
    assert parse_unet_flags({"class_cond": "true", "attention_resolutions": (32, 16)}) == (
        parse_unet_flags("--class_cond=True --attention_resolutions 32,16"))
    assert parse_classifier_flags("").classifier_width == 128
    with pytest.raises(GuidedDiffusionError, match=r"unknown UNetFlags flag --num_chanels "
                                                   r"\(did you mean --num_channels\?\)"):
        parse_unet_flags("--image_size 32 --num_chanels 64")
    with pytest.raises(GuidedDiffusionError, match=r"--classifier_width \(a classifier flag"):
        parse_unet_flags("--classifier_width 64")
    with pytest.raises(GuidedDiffusionError, match=r"--class_cond must be True or False"):
        parse_unet_flags("--class_cond maybe")
    with pytest.raises(GuidedDiffusionError, match=r"--num_res_blocks has no value"):
        parse_unet_flags("--num_res_blocks --image_size 32")


def test_unsupported_flags_are_named():
    reference = reference_unet(UNET_FLAGS, 2)
    state = reference.state_dict()
    for flags, match in [
        (UNET_FLAGS.replace("--class_cond True", "--class_cond False"), "--class_cond False"),
        (f"{UNET_FLAGS} --predict_xstart True", "--predict_xstart True"),
        (f"{UNET_FLAGS} --rescale_timesteps True --diffusion_steps 4000", "--rescale_timesteps"),
        (UNET_FLAGS.replace("--channel_mult 1,2,2", "--channel_mult 2,2,4"), "--channel_mult"),
        (UNET_FLAGS.replace("--channel_mult 1,2,2", ""), "--channel_mult is empty"),
    ]:
        with pytest.raises(GuidedDiffusionError, match=match):
            convert_unet(state, flags, ["a", "b"])
    classifier = reference_classifier("attention", 2).state_dict()
    for extra, match in [("--classifier_pool spatial", "--classifier_pool spatial"),
                         ("--classifier_resblock_updown False", "--classifier_resblock_updown"),
                         ("--classifier_use_scale_shift_norm False",
                          "--classifier_use_scale_shift_norm")]:
        with pytest.raises(GuidedDiffusionError, match=match):
            convert_classifier(classifier, f"{CLASSIFIER_FLAGS} {extra}", ["a", "b"])


@pytest.mark.parametrize(("schedule", "steps"), [("linear", 1000), ("linear", 4000),
                                                 ("cosine", 1000), ("cosine", 250)])
def test_the_noise_schedule_is_guided_diffusions(schedule, steps):
    ours = noise_schedule(f"--noise_schedule {schedule} --diffusion_steps {steps}")
    assert ours.num_train_timesteps == steps
    expected = get_named_beta_schedule(schedule, steps)
    np.testing.assert_allclose(ours.ddpm().betas.double().numpy(), expected, rtol=1e-5,
                               atol=1e-9)


def test_converted_folders_load_and_the_command_runs(tmp_path, capsys):
    from cellflow.cli import main

    unet_reference = reference_unet(f"{UNET_FLAGS} --learn_sigma True", 2)
    classifier_reference = reference_classifier("attention", 2)
    unet_path, classifier_path = tmp_path / "unet.pt", tmp_path / "classifier.pt"
    torch.save(unet_reference.state_dict(), unet_path)
    torch.save(classifier_reference.state_dict(), classifier_path)
    out = tmp_path / "models"
    # our order is the reverse of guided-diffusion's sorted one
    assert main(["import-guided-diffusion", "--unet", str(unet_path), "--unet-flags",
                 f"{UNET_FLAGS} --learn_sigma True --noise_schedule cosine", "--classifier",
                 str(classifier_path), "--classifier-flags", CLASSIFIER_FLAGS,
                 "--classes", "tumor,normal", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "unet: unet.pt ->" in summary and "classifier: classifier.pt ->" in summary
    assert "0=tumor (checkpoint label 1), 1=normal (checkpoint label 0)" in summary

    unet = UNet2DModel.from_pretrained(out / "diffusion" / "unet").eval()
    classifier = NoiseAwareClassifier.from_pretrained(out / "classifier" / "classifier").eval()
    labels = torch.tensor([0, 1])
    assert eps_difference(unet_reference, unet, labels, torch.tensor([1, 0])) < 1e-5
    x, t = inputs(2), torch.tensor([5, 900])
    with torch.no_grad():
        assert (classifier(x, t) - classifier_reference(x, t)[:, [1, 0]]).abs().max() < 1e-5
    scheduler = DDPMScheduler.from_pretrained(out / "diffusion" / "scheduler")
    np.testing.assert_allclose(scheduler.betas.double().numpy(),
                               get_named_beta_schedule("cosine", 1000), rtol=1e-5)
    record = json.loads((out / "conversion.json").read_text())
    assert record["classes"] == ["tumor", "normal"]
    entry = record["models"]["unet"]
    assert entry["source"]["sha256"] == file_sha256(unet_path)
    assert entry["flags"]["learn_sigma"] is True and entry["qkv_order"] == "legacy"
    assert record["models"]["classifier"]["source"]["file"] == "classifier.pt"

    # a failed conversion reports its reason and leaves the folders as they were
    assert main(["import-guided-diffusion", "--unet", str(unet_path), "--unet-flags",
                 UNET_FLAGS, "--classes", "a,b,c", "--out", str(out)]) == 1
    assert "has 2 classes" in capsys.readouterr().err
    assert UNet2DModel.from_pretrained(out / "diffusion" / "unet").config.out_channels == 6

    # only a classifier: the diffusion folder and its record stay
    converted = convert_classifier(classifier_reference.state_dict(), CLASSIFIER_FLAGS,
                                   ["tumor", "normal"])
    record = write_converted(out, classifier=converted)
    assert set(record["models"]) == {"unet", "classifier"}
    assert record["models"]["classifier"]["source"] is None
    assert (out / "diffusion" / "unet").is_dir()


def test_a_checkpoint_of_other_classes_converts_in_its_own_order_for_fine_tuning(tmp_path,
                                                                                  capsys):
    """Without --classes (a model to fine-tune from, e.g. ImageNet's): the checkpoint's label
    order is kept, its classes numbered unless --checkpoint-classes names them."""
    from cellflow.cli import main

    reference = reference_unet(UNET_FLAGS, 3)
    path = tmp_path / "other.pt"
    torch.save(reference.state_dict(), path)
    assert main(["import-guided-diffusion", "--unet", str(path), "--unet-flags", UNET_FLAGS,
                 "--out", str(tmp_path / "numbered")]) == 0
    record = json.loads((tmp_path / "numbered" / "conversion.json").read_text())
    assert record["classes"] == ["0", "1", "2"]
    unet = UNet2DModel.from_pretrained(tmp_path / "numbered" / "diffusion" / "unet")
    assert torch.equal(unet.class_embedding.weight, reference.label_emb.weight)
    assert main(["import-guided-diffusion", "--unet", str(path), "--unet-flags", UNET_FLAGS,
                 "--checkpoint-classes", "zebra,ant,moth", "--out", str(tmp_path / "named")]) == 0
    record = json.loads((tmp_path / "named" / "conversion.json").read_text())
    assert record["classes"] == ["zebra", "ant", "moth"]  # not sorted: the checkpoint's order
    capsys.readouterr()
