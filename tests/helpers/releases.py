"""Checkpoints in the layouts that the major self-supervised releases write, for the tests.

Each builder follows the saving (or converting) code named in its docstring: the entries of
the file, the wrappers and prefixes of the names, the heads and second trunks beside the
trunk. Tensors have ResNet-50 shapes, but each is one constant expanded to its shape, so a
file costs almost no memory: the trunk the authors evaluate holds TAKEN + k/1000 in its
k-th tensor, a second trunk OTHER + k/1000, a third THIRD + k/1000. Taking another trunk, or
giving a tensor another's name, changes values a test compares.

:data:`RELEASES` maps a name to (builder, file suffix, layout the tools print, second trunks
named, input normalisation recorded).
"""

import argparse

import torch

from moco_d2.convert import layouts, resnet

SHAPES = resnet.resnet50_shapes()
TAKEN, OTHER, THIRD = 1.0, 2.0, 3.0


def trunk(base, counters=True, fc=None):
    """A torchvision ResNet-50 trunk (BN batch counters, and an ``fc`` of ``fc`` classes)."""
    state = {
        name: torch.tensor(base + k / 1000).expand(shape)
        for k, (name, shape) in enumerate(SHAPES.items())
    }
    if counters:
        for name in [n for n in state if n.endswith(".running_var")]:
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    if fc:
        state["fc.weight"] = torch.zeros(()).expand(fc, 2048)
        state["fc.bias"] = torch.zeros(fc)
    return state


def expected(base):
    """What the reader must return for a trunk built with ``base``: torchvision name → value."""
    return {name: base + k / 1000 for k, name in enumerate(SHAPES)}


def prefixed(prefix, state):
    return {prefix + name: value for name, value in state.items()}


def head(*names):
    return {name: torch.zeros(3) for name in names}


def bn(prefix, affine=True):
    names = ["running_mean", "running_var", "num_batches_tracked"]
    return head(*(f"{prefix}.{n}" for n in (["weight", "bias"] if affine else []) + names))


def sequential(state):
    """The names ``nn.Sequential(*list(resnet.children())[:-1])`` gives the same tensors."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    out = {}
    for name, value in state.items():
        top, rest = name.split(".", 1)
        out[f"{index[top]}.{rest}"] = value
    return out


OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}


def moco_v2():
    """facebookresearch/moco main_moco.py: {'epoch', 'arch', 'state_dict', 'optimizer'} of
    DDP(MoCo): encoder_q (its fc the --mlp head), encoder_k, queue, queue_ptr."""
    mlp = head("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias")
    state = {
        **prefixed("module.encoder_q.", {**trunk(TAKEN), **mlp}),
        **prefixed("module.encoder_k.", {**trunk(OTHER), **mlp}),
        "module.queue": torch.zeros(128, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": OPTIMIZER}


def moco_v3():
    """facebookresearch/moco-v3 main_moco.py: {'epoch', 'arch', 'state_dict', 'optimizer',
    'scaler'} of DDP(MoCo_ResNet): base_encoder and momentum_encoder, each with its fc
    replaced by the projector MLP (Linear, BN, ReLU, Linear, BN without affine), predictor."""
    projector = {**head("fc.0.weight", "fc.3.weight"), **bn("fc.1"), **bn("fc.4", affine=False)}
    predictor = {**head("predictor.0.weight", "predictor.3.weight"), **bn("predictor.1")}
    state = {
        **prefixed("module.base_encoder.", {**trunk(TAKEN), **projector}),
        **prefixed("module.momentum_encoder.", {**trunk(OTHER), **projector}),
        **prefixed("module.", predictor),
    }
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
    }
    return {
        "epoch": 300,
        "arch": "resnet50",
        "state_dict": state,
        "optimizer": OPTIMIZER,
        "scaler": scaler,
    }


def _swav_heads():
    return {**head("projection_head.0.weight", "projection_head.0.bias"), **bn("projection_head.1")}


def swav():
    """facebookresearch/swav main_swav.py: {'epoch', 'state_dict', 'optimizer', 'amp'} of
    DDP(resnet50 with projection_head and prototypes; no fc)."""
    heads = {**_swav_heads(), **head("projection_head.3.weight", "prototypes.weight")}
    state = prefixed("module.", {**trunk(TAKEN), **heads})
    amp = {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 12}}
    return {"epoch": 800, "state_dict": state, "optimizer": OPTIMIZER, "amp": amp}


def deepcluster_v2():
    """facebookresearch/swav hubconf.py's deepclusterv2 file: the bare DDP state_dict of
    main_deepclusterv2.py, three prototype heads (MultiPrototypes)."""
    prototypes = head(*(f"prototypes.prototypes{k}.weight" for k in range(3)))
    return prefixed("module.", {**trunk(TAKEN), **_swav_heads(), **prototypes})


def dino_full():
    """facebookresearch/dino main_dino.py: {'student', 'teacher', 'optimizer', 'epoch',
    'args' (an argparse.Namespace), 'dino_loss', 'fp16_scaler'}; a ResNet teacher is wrapped
    in DDP too (for SyncBN), so both hold module.backbone.* (fc an Identity) and module.head.*."""
    dino_head = head(
        *(f"module.head.mlp.{k}.{t}" for k in (0, 2, 4) for t in ("weight", "bias")),
        "module.head.last_layer.weight_g",
        "module.head.last_layer.weight_v",
    )
    args = argparse.Namespace(arch="resnet50", out_dim=60000, lr=0.3, use_fp16=True)
    return {
        "student": {**prefixed("module.backbone.", trunk(OTHER)), **dino_head},
        "teacher": {**prefixed("module.backbone.", trunk(TAKEN)), **dino_head},
        "optimizer": OPTIMIZER,
        "epoch": 800,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 60000)},
        "fp16_scaler": {"scale": 1024.0, "growth_factor": 2.0},
    }


def barlow_twins():
    """facebookresearch/barlowtwins main.py: dict(epoch, model=model.state_dict(), optimizer)
    of DDP(BarlowTwins): backbone (resnet50, fc an Identity), projector, bn (no affine)."""
    projector = {
        **head("module.projector.0.weight", "module.projector.3.weight"),
        **bn("module.projector.1"),
        **bn("module.projector.4"),
        **head("module.projector.6.weight"),
    }
    model = {**prefixed("module.backbone.", trunk(TAKEN)), **projector, **bn("module.bn", False)}
    return {"epoch": 1000, "model": model, "optimizer": OPTIMIZER}


def vicreg():
    """facebookresearch/vicreg main_vicreg.py: the same dict as Barlow Twins' of DDP(VICReg):
    backbone, projector."""
    projector = {
        **head("module.projector.0.weight", "module.projector.0.bias"),
        **bn("module.projector.1"),
        **head("module.projector.6.weight"),
    }
    model = {**prefixed("module.backbone.", trunk(TAKEN)), **projector}
    return {"epoch": 1000, "model": model, "optimizer": OPTIMIZER}


def pixpro():
    """zdaxie/PixPro main_pretrain.py: {'opt' (the argparse.Namespace), 'model', 'optimizer',
    'scheduler', 'epoch'} of DDP(PixPro): encoder, encoder_k and the MLP2d projectors,
    value_transform, the instance branch's projectors and predictor."""

    def mlp2d(name):
        return {**head(f"{name}.linear1.weight", f"{name}.linear2.weight"), **bn(f"{name}.bn1")}

    heads = {}
    for name in ("projector", "projector_k", "projector_instance", "projector_instance_k"):
        heads.update(mlp2d(name))
    heads.update({**mlp2d("predictor"), **head("value_transform.weight", "value_transform.bias")})
    model = prefixed(
        "module.", {**prefixed("encoder.", trunk(TAKEN)), **prefixed("encoder_k.", trunk(OTHER))}
    )
    model.update(prefixed("module.", heads))
    scheduler = {"base_lrs": [1.0], "last_epoch": 9, "after_scheduler": {"T_max": 100}}
    opt = argparse.Namespace(arch="resnet50", model="PixPro", epochs=400, pixpro_p=2.0)
    return {
        "opt": opt,
        "model": model,
        "optimizer": OPTIMIZER,
        "scheduler": scheduler,
        "epoch": 400,
    }


MMCV_META = {"epoch": 200, "iter": 1000800, "mmcv_version": "1.3.0", "time": "Sat Jan 1 2022"}


def densecl():
    """WXinlong/DenseCL (OpenSelfSup): mmcv's {'meta', 'state_dict', 'optimizer'} of DenseCL,
    whose self.backbone is encoder_q[0]: the same tensors as backbone.* and encoder_q.0.*,
    then encoder_k, the neck (encoder_q.1), the two queues."""
    query = trunk(TAKEN)
    neck = head("mlp.0.weight", "mlp.0.bias", "mlp2.0.weight", "mlp2.0.bias")
    state = {
        **prefixed("backbone.", query),
        **prefixed("encoder_q.0.", query),
        **prefixed("encoder_q.1.", neck),
        **prefixed("encoder_k.0.", trunk(OTHER)),
        **prefixed("encoder_k.1.", neck),
        **head("queue", "queue_ptr", "queue2", "queue2_ptr"),
    }
    return {"meta": MMCV_META, "state_dict": state, "optimizer": OPTIMIZER}


MMENGINE_META = {"epoch": 200, "iter": 250200, "mmengine_version": "0.7.0", "seed": 0}


def mmselfsup_mocov2():
    """open-mmlab/mmselfsup 1.x MoCoV2: mmengine's {'meta', 'state_dict'} (after
    publish_model): backbone, neck, encoder_k = ExponentialMovingAverage(Sequential(backbone,
    neck)), whose module.0.* is the key trunk and steps its counter, queue."""
    neck = head("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
    state = {
        **prefixed("backbone.", trunk(TAKEN)),
        **prefixed("neck.", neck),
        **prefixed("encoder_k.module.0.", trunk(OTHER)),
        **prefixed("encoder_k.module.1.", neck),
        **head("encoder_k.steps", "queue", "queue_ptr"),
    }
    return {"meta": MMENGINE_META, "state_dict": state}


def mmselfsup_byol():
    """open-mmlab/mmselfsup 1.x BYOL: backbone (the online network), neck, head.predictor,
    target_net = ExponentialMovingAverage(Sequential(backbone, neck))."""
    state = {
        **prefixed("backbone.", trunk(TAKEN)),
        **head("neck.mlp.0.weight", "head.predictor.mlp.0.weight"),
        **prefixed("target_net.module.0.", trunk(OTHER)),
        **head("target_net.module.1.mlp.0.weight", "target_net.steps"),
    }
    return {"meta": MMENGINE_META, "state_dict": state}


def mmpretrain_mocov3():
    """open-mmlab/mmpretrain MoCoV3 (ResNet): backbone, neck, head.predictor,
    momentum_encoder = CosineEMA(Sequential(backbone, neck))."""
    state = {
        **prefixed("backbone.", trunk(TAKEN)),
        **head("neck.mlp.0.weight", "head.predictor.mlp.0.weight"),
        **prefixed("momentum_encoder.module.0.", trunk(OTHER)),
        **head("momentum_encoder.module.1.mlp.0.weight", "momentum_encoder.steps"),
    }
    return {"meta": MMENGINE_META, "state_dict": state}


def lightning(state, **more):
    """A PyTorch Lightning .ckpt around ``state`` (Trainer.save_checkpoint's entries)."""
    return {
        "epoch": 99,
        "global_step": 500400,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 99}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": ""}},
        "optimizer_states": [OPTIMIZER],
        "lr_schedulers": [{"base_lrs": [0.1], "last_epoch": 500400}],
        **more,
    }


def solo_learn_byol():
    """vturrisi/solo-learn BYOL (BaseMomentumMethod), a Lightning .ckpt: backbone (fc an
    Identity), projector, predictor, the online classifier, momentum_backbone,
    momentum_projector."""
    state = {
        **prefixed("backbone.", trunk(TAKEN)),
        **head("projector.0.weight", "predictor.0.weight", "classifier.weight", "classifier.bias"),
        **prefixed("momentum_backbone.", trunk(OTHER)),
        **head("momentum_projector.0.weight"),
    }
    return lightning(state)


def lightly_dino():
    """lightly benchmarks/imagenet/resnet50/dino.py, a Lightning .ckpt: backbone (the
    teacher, which it evaluates), projection_head, student_backbone, student_projection_head,
    criterion (DINOLoss's center), online_classifier."""
    state = {
        **prefixed("backbone.", trunk(TAKEN)),
        **head("projection_head.layers.0.weight", "projection_head.last_layer.weight_v"),
        **prefixed("student_backbone.", trunk(OTHER)),
        **head("student_projection_head.layers.0.weight", "criterion.center"),
        **head("online_classifier.classification_head.weight"),
    }
    return lightning(state, hyper_parameters={"batch_size_per_device": 128, "num_classes": 1000})


def lightly_byol_example():
    """lightly examples/pytorch_lightning/byol.py: backbone = nn.Sequential(*children()[:-1])
    (indices 0, 1, 4-7), projection_head, prediction_head, backbone_momentum,
    projection_head_momentum."""
    state = {
        **prefixed("backbone.", sequential(trunk(TAKEN))),
        **head("projection_head.layers.0.weight", "prediction_head.layers.0.weight"),
        **prefixed("backbone_momentum.", sequential(trunk(OTHER))),
        **head("projection_head_momentum.layers.0.weight"),
    }
    return lightning(state)


def lightly_recipe():
    """lightly's docs: torch.save(backbone.state_dict()) of nn.Sequential(*children()[:-1])."""
    return sequential(trunk(TAKEN))


def lightly_dino_example():
    """lightly examples/pytorch_lightning/dino.py: student_backbone and teacher_backbone
    (Sequential), student_head, teacher_head; no backbone, and no rule: refused."""
    state = {
        **prefixed("student_backbone.", sequential(trunk(OTHER))),
        **prefixed("teacher_backbone.", sequential(trunk(TAKEN))),
        **head("student_head.layer.0.weight", "teacher_head.layer.0.weight"),
    }
    return lightning(state)


def vissl():
    """facebookresearch/vissl checkpoints: classy_state_dict.base_model.model.trunk holds
    _feature_blocks.*, its heads beside it."""
    model = {
        "trunk": prefixed("_feature_blocks.", trunk(TAKEN)),
        "heads": head("0.clf.0.weight", "0.clf.0.bias"),
    }
    return {
        "phase_idx": 199,
        "iteration": 500000,
        "train_phase_idx": 199,
        "loss": {"num_negatives": 16000},
        "classy_state_dict": {"train": True, "base_model": {"model": model, "meta": {}}},
    }


def vissl_model_state_dict():
    """facebookresearch/vissl extra_scripts: a model_state_dict of _feature_blocks.* names."""
    return {"model_state_dict": prefixed("_feature_blocks.", trunk(TAKEN))}


def simclr_v2_names(state):
    """SimCLR v2 r50_1x_sk0 names, as Separius/SimCLRv2-Pytorch's resnet.py gives them: net.0
    the stem (conv, BatchNormRelu = Sequential(BN, ReLU)), net.S.blocks.B for stage S, each
    block a projection (conv + BatchNormRelu, block 0) and net = conv, BNReLU x3."""
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] == "conv1":
            new = "net.0.0.weight"
        elif parts[0] == "bn1":
            new = f"net.0.1.0.{parts[1]}"
        elif parts[0] == "fc":
            new = name
        else:
            block = f"net.{parts[0][-1]}.blocks.{parts[1]}"
            module, rest = parts[2], parts[3:]
            if module == "downsample":
                new = (
                    f"{block}.projection.shortcut.weight"
                    if rest[0] == "0"
                    else f"{block}.projection.bn.0.{rest[1]}"
                )
            elif module.startswith("conv"):
                new = f"{block}.net.{2 * int(module[-1]) - 2}.weight"
            else:
                new = f"{block}.net.{2 * int(module[-1]) - 1}.0.{rest[0]}"
        out[new] = value
    return out


def simclr_v2():
    """Separius/SimCLRv2-Pytorch convert.py: {'resnet': ResNet.state_dict() (with its
    supervised fc), 'head': ContrastiveHead.state_dict()}."""
    contrastive = head(*(f"layers.{k}.weight" for k in (0, 3, 6)), "layers.1.weight")
    return {"resnet": simclr_v2_names(trunk(TAKEN, fc=1000)), "head": contrastive}


def simclr_v2_wide():
    """SimCLRv2-Pytorch's r50_2x_sk0: every channel count doubled."""
    state = simclr_v2_names(trunk(TAKEN))
    state["net.0.0.weight"] = torch.zeros(()).expand(128, 3, 7, 7)
    return {"resnet": state, "head": {}}


def simclr_v2_sk():
    """SimCLRv2-Pytorch's r50_1x_sk1: a three-conv stem and selective-kernel blocks."""
    state = simclr_v2_names(trunk(TAKEN))
    for k in (2, 4):
        state[f"net.0.{k}.weight"] = torch.zeros(()).expand(32, 32, 3, 3)
    state["net.1.blocks.0.net.2.main_conv.0.weight"] = state.pop("net.1.blocks.0.net.2.weight")
    return {"resnet": state, "head": {}}


def simclr_v1():
    """tonylins/simclr-converter convert.py: torch.save({'state_dict': model.state_dict()})
    of its torchvision-named resnet50x1, with the supervised fc."""
    return {"state_dict": trunk(TAKEN, fc=1000)}


def byol_converted():
    """ajtejankar/byol-convert convert.py: the online network's torchvision state_dict,
    without BN counters, with the classifier."""
    return trunk(TAKEN, counters=False, fc=1000)


def timm_train():
    """huggingface/pytorch-image-models timm/utils/checkpoint_saver.py: {'epoch', 'arch',
    'state_dict', 'optimizer', 'version', 'args' (argparse.Namespace), 'state_dict_ema',
    'metric'}."""
    return {
        "epoch": 299,
        "arch": "resnet50",
        "state_dict": trunk(TAKEN, fc=1000),
        "optimizer": OPTIMIZER,
        "version": 2,
        "args": argparse.Namespace(model="resnet50", lr=0.5, model_ema=True),
        "state_dict_ema": trunk(OTHER, fc=1000),
        "metric": 80.4,
    }


def compiled():
    """torch.save(torch.compile(model).state_dict()): every name under _orig_mod."""
    return prefixed("_orig_mod.", trunk(TAKEN, fc=1000))


IMAGENET, RGB01 = layouts.IMAGENET, layouts.RGB01
TORCHVISION_FC = "torchvision ResNet state_dict with an ImageNet classifier"

RELEASES = {
    "moco_v2": (
        moco_v2,
        ".pth.tar",
        "MoCo checkpoint, state_dict with module.encoder_q.*",
        ["module.encoder_k"],
        IMAGENET,
    ),
    "moco_v3": (
        moco_v3,
        ".pth.tar",
        "checkpoint, state_dict with module.base_encoder.*",
        ["module.momentum_encoder"],
        IMAGENET,
    ),
    "swav": (
        swav,
        ".pth.tar",
        "bare query-encoder state_dict in a checkpoint's state_dict with module.* names",
        [],
        IMAGENET,
    ),
    "deepcluster_v2": (
        deepcluster_v2,
        ".pth.tar",
        "bare query-encoder state_dict with module.* names",
        [],
        IMAGENET,
    ),
    "dino_full": (
        dino_full,
        ".pth",
        "checkpoint, teacher with module.backbone.*",
        ["student"],
        IMAGENET,
    ),
    "barlow_twins": (
        barlow_twins,
        ".pth",
        "checkpoint, model with module.backbone.*",
        [],
        IMAGENET,
    ),
    "vicreg": (vicreg, ".pth", "checkpoint, model with module.backbone.*", [], IMAGENET),
    "pixpro": (
        pixpro,
        ".pth",
        "checkpoint, model with module.encoder.*",
        ["module.encoder_k"],
        IMAGENET,
    ),
    "densecl": (
        densecl,
        ".pth",
        "checkpoint, state_dict with backbone.*",
        ["encoder_q.0", "encoder_k.0"],
        IMAGENET,
    ),
    "mmselfsup_mocov2": (
        mmselfsup_mocov2,
        ".pth",
        "checkpoint, state_dict with backbone.*",
        ["encoder_k.module.0"],
        IMAGENET,
    ),
    "mmselfsup_byol": (
        mmselfsup_byol,
        ".pth",
        "checkpoint, state_dict with backbone.*",
        ["target_net.module.0"],
        IMAGENET,
    ),
    "mmpretrain_mocov3": (
        mmpretrain_mocov3,
        ".pth",
        "checkpoint, state_dict with backbone.*",
        ["momentum_encoder.module.0"],
        IMAGENET,
    ),
    "solo_learn_byol": (
        solo_learn_byol,
        ".ckpt",
        "checkpoint, state_dict with backbone.*",
        ["momentum_backbone"],
        IMAGENET,
    ),
    "lightly_dino": (
        lightly_dino,
        ".ckpt",
        "checkpoint, state_dict with backbone.*",
        ["student_backbone"],
        IMAGENET,
    ),
    "lightly_byol_example": (
        lightly_byol_example,
        ".ckpt",
        "checkpoint, state_dict with backbone.* (nn.Sequential indices 0, 1, 4-7)",
        ["backbone_momentum"],
        IMAGENET,
    ),
    "lightly_recipe": (
        lightly_recipe,
        ".pth",
        "nn.Sequential(*resnet.children()) state_dict (indices 0, 1, 4-7)",
        [],
        IMAGENET,
    ),
    "vissl": (
        vissl,
        ".torch",
        "checkpoint, classy_state_dict.base_model.model.trunk with _feature_blocks.*",
        [],
        IMAGENET,
    ),
    "vissl_model_state_dict": (
        vissl_model_state_dict,
        ".torch",
        "checkpoint, model_state_dict with _feature_blocks.*",
        [],
        IMAGENET,
    ),
    "simclr_v2": (
        simclr_v2,
        ".pth",
        "SimCLR v2 ResNet as SimCLRv2-Pytorch converts it in a checkpoint's resnet",
        [],
        RGB01,
    ),
    "simclr_v1": (simclr_v1, ".pth", TORCHVISION_FC + " in a checkpoint's state_dict", [], None),
    "byol_converted": (byol_converted, ".pth.tar", TORCHVISION_FC, [], None),
    "timm_train": (
        timm_train,
        ".pth.tar",
        TORCHVISION_FC + " in a checkpoint's state_dict",
        ["state_dict_ema"],
        IMAGENET,
    ),
    "compiled": (compiled, ".pth", TORCHVISION_FC + " with _orig_mod.* names", [], None),
}


def save(directory, name, legacy=False):
    """Write release ``name``'s checkpoint under ``directory`` as torch.save does; its path."""
    build, suffix = RELEASES[name][:2]
    path = directory / f"{name}{suffix}"
    torch.save(build(), path, _use_new_zipfile_serialization=not legacy)
    return str(path)
