"""The opt-in convolution paths (Winograd F(2x2, 3x3) and im2col GEMM): equal to conv2d up to fp32
rounding, for every shape and memory format they accept, and out of the way wherever they do not apply."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.fast.conv_paths import configure_convolutions

# relative to the output's scale; measured ~5e-7 (the transforms are exact in binary, the products round)
REL_TOL = 5e-6


@pytest.fixture(autouse=True)
def every_layer(monkeypatch):
    """These small layers are below the measured pay-off bounds; lift them to test the arithmetic."""
    import ldm.fast.conv_paths as c

    monkeypatch.setattr(c, "MIN_CHANNELS", 1)
    monkeypatch.setattr(c, "WINOGRAD_MAX_PIXELS", 10**9)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (1, 3, 7, 9), (2, 5, 1, 1), (1, 4, 2, 3), (3, 16, 6, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_conv2d(shape, channels_last, bias):
    g = torch.Generator().manual_seed(sum(shape))
    conv = nn.Conv2d(shape[1], 6, 3, padding=1, bias=bias)
    x = torch.randn(*shape, generator=g) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        conv.winograd = True
        got = conv(x)
    assert got.shape == want.shape
    assert _relative_error(got, want) <= REL_TOL
    if channels_last and shape[2] % 2 == 0 and shape[3] % 2 == 0:
        assert got.is_contiguous(memory_format=torch.channels_last)  # the next layer keeps its format


def test_winograd_path_is_taken_and_follows_weight_changes(monkeypatch):
    import ldm.fast.conv_paths as c
    import ldm.fast.winograd as w

    calls = []
    monkeypatch.setattr(c, "winograd_conv3x3", lambda *a: calls.append(1) or F.conv2d(a[0], conv.weight, a[2], padding=1))
    conv = nn.Conv2d(4, 4, 3, padding=1)
    configure_convolutions(nn.Sequential(conv), winograd=True)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        conv(x)
        kernel = conv._kernel
        conv(x)
        assert conv._kernel is kernel  # cached
        conv.weight.mul_(2)  # an optimizer step or load_state_dict: in place
        conv(x)
        assert conv._kernel is not kernel
        torch.testing.assert_close(conv._kernel, w.transform_kernel(conv.weight))
    assert len(calls) == 3


def test_other_cases_take_the_ordinary_path():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    strided = nn.Conv2d(4, 4, 3, stride=2, padding=1)
    configure_convolutions(nn.Sequential(conv, strided), winograd=True)
    out = conv(x)  # gradients on (training): ordinary path, gradients flow
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(strided(x), F.conv2d(x, strided.weight, strided.bias, stride=2, padding=1))
        conv16 = conv.to(torch.bfloat16)  # reduced precision: the transforms would round, so not used
        assert torch.equal(conv16(x.bfloat16()), F.conv2d(x.bfloat16(), conv16.weight, conv16.bias, padding=1))


def test_layers_outside_the_pay_off_bounds_take_the_ordinary_path(monkeypatch):
    import ldm.fast.conv_paths as c

    monkeypatch.setattr(c, "MIN_CHANNELS", 8)
    monkeypatch.setattr(c, "WINOGRAD_MAX_PIXELS", 64)
    narrow, wide = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    configure_convolutions(nn.Sequential(narrow, wide), winograd=True)
    with torch.no_grad():
        narrow(torch.randn(1, 4, 8, 8))
        wide(torch.randn(1, 8, 16, 16))  # 256 pixels > 64
        assert narrow._kernel is None and wide._kernel is None
        wide(torch.randn(1, 8, 8, 8))
        assert wide._kernel is not None


def test_state_dict_keys_are_those_of_nn_conv2d():
    ours, theirs = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    configure_convolutions(ours, winograd=True)
    with torch.no_grad():
        ours(torch.randn(1, 3, 4, 4))
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # the cached kernel is not saved


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_maps_are_done_in_bands_with_the_same_result(monkeypatch, channels_last):
    import ldm.fast.winograd as w

    conv = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 13, 10, generator=torch.Generator().manual_seed(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    configure_convolutions(conv, winograd=True)
    with torch.no_grad():
        whole = conv(x)
        monkeypatch.setattr(w, "BAND_BYTES", 1)  # one tile row per band: 7 bands
        banded = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
    # the same arithmetic per tile; only the matmul sizes (and so the BLAS blocking) differ
    assert _relative_error(banded, whole) <= REL_TOL
    assert _relative_error(banded, want) <= REL_TOL


@pytest.mark.parametrize("shape", [(2, 8, 4, 4), (1, 6, 7, 5), (1, 3, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_im2col_matches_conv2d_reading_the_weight_in_place(shape, channels_last, bias):
    import ldm.fast.conv_paths as c

    g = torch.Generator().manual_seed(sum(shape))
    conv = nn.Conv2d(shape[1], 5, 3, padding=1, bias=bias)
    x = torch.randn(*shape, generator=g)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        got = c.im2col_conv3x3(x, conv.weight, conv.bias)
    assert got.shape == want.shape and _relative_error(got, want) <= REL_TOL
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_im2col_and_winograd_split_the_layers_by_map_size(monkeypatch):
    import ldm.fast.conv_paths as c

    monkeypatch.setattr(c, "IM2COL_MAX_PIXELS", 64)
    monkeypatch.setattr(c, "IM2COL_OVER_WINOGRAD_PIXELS", 16)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    small, medium, large = (torch.randn(1, 4, s, s) for s in (4, 8, 16))
    with torch.no_grad():
        configure_convolutions(conv, im2col=True)
        assert [conv._path(x) for x in (small, medium, large)] == ["im2col", "im2col", "direct"]
        configure_convolutions(conv, winograd=True, im2col=True)
        assert [conv._path(x) for x in (small, medium, large)] == ["im2col", "winograd", "winograd"]
        conv(small)
        assert conv._kernel is None  # im2col holds nothing
        for x in (small, medium, large):
            assert _relative_error(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) <= REL_TOL


@pytest.mark.parametrize("stride,padding,size", [(2, 1, (8, 8)), (2, 1, (7, 5)), (2, 0, (9, 9)), (1, 0, (6, 7))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_im2col_strided_and_unpadded_matches_conv2d(stride, padding, size, channels_last):
    import ldm.fast.conv_paths as c

    conv = nn.Conv2d(6, 5, 3, stride=stride, padding=padding)
    x = torch.randn(2, 6, *size, generator=torch.Generator().manual_seed(stride + padding))
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
        got = c.im2col_conv3x3(x, conv.weight, conv.bias, stride, padding)
        configure_convolutions(conv, im2col=True)
        assert conv._path(x) == "im2col"  # downsamplers take it too (their outputs are small)
        through_layer = conv(x)
    assert got.shape == want.shape and _relative_error(got, want) <= REL_TOL
    assert torch.equal(through_layer, got)


@pytest.mark.parametrize("channels_last", [False, True])
def test_transient_winograd_matches_conv2d_and_keeps_nothing(channels_last):
    import ldm.fast.winograd as w

    conv = nn.Conv2d(7, 6, 3, padding=1)
    x = torch.randn(2, 7, 10, 9, generator=torch.Generator().manual_seed(5))
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    configure_convolutions(conv, winograd="transient")
    with torch.no_grad():
        assert conv._path(x) == "winograd"
        got = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        # the fp32 transform equals the float64 one up to fp32 rounding
        assert _relative_error(w.transform_kernel_fp32(conv.weight), w.transform_kernel(conv.weight)) <= 1e-6
    assert conv._kernel is None
    assert _relative_error(got, want) <= REL_TOL


def test_transient_winograd_leaves_wide_layers_to_im2col_or_the_direct_kernel(monkeypatch):
    import ldm.fast.conv_paths as c

    monkeypatch.setattr(c, "TRANSIENT_MAX_CHANNELS", 8)
    monkeypatch.setattr(c, "IM2COL_MAX_PIXELS", 16)
    monkeypatch.setattr(c, "IM2COL_WIDE_WEIGHTS", 12 * 12)
    narrow, wide, widest = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(12, 8, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1)
    configure_convolutions(nn.Sequential(narrow, wide, widest), winograd="transient", im2col=True)
    x8, x12 = torch.randn(1, 8, 16, 16), torch.randn(1, 12, 16, 16)  # 256 pixels: above IM2COL_MAX_PIXELS
    with torch.no_grad():
        assert [narrow._path(x8), wide._path(x12), widest._path(x12)] == ["winograd", "direct", "im2col"]
        configure_convolutions(widest, winograd="cached", im2col=True)
        assert widest._path(x12) == "winograd"  # a cached kernel pays on wide layers too



def test_strided_layers_take_im2col_up_to_its_bound_even_with_cached_winograd():
    strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    configure_convolutions(strided, winograd="cached", im2col=True)
    x = torch.randn(1, 8, 12, 12)  # 6x6 output: above IM2COL_OVER_WINOGRAD_PIXELS, but Winograd is stride 1 only
    with torch.no_grad():
        assert strided._path(x) == "im2col"
        assert _relative_error(strided(x), F.conv2d(x, strided.weight, strided.bias, stride=2, padding=1)) <= REL_TOL


def test_unknown_winograd_mode_is_refused():
    with pytest.raises(ValueError, match="winograd must be one of cached, transient"):
        configure_convolutions(nn.Conv2d(4, 4, 3, padding=1), winograd="fast")
