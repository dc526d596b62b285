import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_model import save_tiny_model

from facedist.checkpoint import load_embedding_model, read_embedding_metadata
from facedist.inference_cli import export_main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, pre, file = save_tiny_model(root / "checkpoint")
    export_main(
        [
            "--checkpoint",
            str(file.parent),
            "--onnx",
            str(root / "model.onnx"),
            "--safetensors",
            str(root / "out.safetensors"),
        ]
    )
    return model, pre, file, root


@pytest.mark.integration
def test_onnx_matches_pytorch_for_any_batch_size(exported):
    model, pre, _, root = exported
    session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 5):  # exported with batch 1: the batch axis must be dynamic
        images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(["embeddings"], {"images": images.numpy()})
        with torch.no_grad():
            expected = model(images).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_onnx_metadata_records_preprocessing(exported):
    _, pre, _, root = exported
    props = {p.key: p.value for p in onnx.load(str(root / "model.onnx")).metadata_props}
    assert json.loads(props["preprocessing"]) == pre
    assert json.loads(props["facedist"])["config"]["model"]["embedding_dim"] == 32


@pytest.mark.integration
def test_safetensors_holds_evaluation_weights_and_reloads(exported):
    model, pre, file, root = exported
    out = root / "out.safetensors"
    source, exported_state = load_file(str(file)), load_file(str(out))
    assert source.keys() == exported_state.keys() and not any(k.startswith("head") for k in exported_state)
    assert all(torch.equal(source[k], exported_state[k]) for k in source)
    assert read_embedding_metadata(out)["preprocessing"] == pre
    reloaded, reloaded_pre, _ = load_embedding_model(out)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images))


def test_export_of_wrong_checkpoint_is_one_line(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("definitely not safetensors")
    with pytest.raises(SystemExit) as err:
        export_main(["--checkpoint", str(bogus), "--onnx", str(tmp_path / "m.onnx")])
    assert str(bogus) in str(err.value.code) and "\n" not in str(err.value.code)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "model_keys",
    [{"input_norm": "retinex"}, {"input_norm": "equalize"}, {"neck": "gdc", "input_scale": 1.5}],
    ids=["retinex", "equalize", "gdc_scaled"],
)
@pytest.mark.integration
def test_model_options_travel_with_the_checkpoint_and_the_onnx_export(tmp_path, model_keys):
    """model.input_norm, neck and input_scale are part of the model: reloading (facedist-embed/-eval/-compare)
    and ONNX apply them."""
    model, _, file = save_tiny_model(tmp_path / "checkpoint", **model_keys)
    export_main(["--checkpoint", str(file.parent), "--onnx", str(tmp_path / "model.onnx")])
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = model(images)
        reloaded, _, _ = load_embedding_model(file.parent)
        torch.testing.assert_close(reloaded(images), expected)
        if "input_norm" in model_keys:
            assert not torch.allclose(model.neck(model.backbone(images)), expected, atol=1e-3)  # it does act
        else:
            assert isinstance(reloaded.neck[0], torch.nn.Conv2d) and reloaded.neck[0].kernel_size == (3, 3)  # 96 px
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["embeddings"], {"images": images.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
