"""The report: graphs numbered per report, passes that cannot apply or are off on this device say so,
repeated rewrites are one row, compile time is labelled, and a cache hit is said, not silent."""
import functools
import logging

import torch

import diffopt
from diffopt.backend import diffopt_backend
from diffopt.report import Report, collecting


class Blocks(torch.nn.Module):
    def __init__(self, n=3, d=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
        self.freqs = torch.nn.Parameter(torch.randn(8, 2 * d), requires_grad=False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * self.freqs[..., 0::2]  # the same slice of one tensor in every block: dedupe
        return x


def test_states_groups_and_labels():
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.randn(8, 16)
    with torch.no_grad():
        report = diffopt.explain(model, x)
    text = str(report)
    assert text.startswith("diffopt: 1 graph(s) compiled")
    assert "compile ms" in text.splitlines()[1]
    rows = {line.split()[0]: line for line in text.splitlines()[3:16] if line and not line.startswith("-")}
    assert rows["ulysses_prefix"].rstrip().endswith("not applicable (no collectives)")
    assert "off on cpu (option devices: ['cuda'])" in rows["qk_norm_rope"]
    assert "off on cpu" in rows["attention"]
    dedupe_rows = [line for line in text.splitlines() if line.startswith("dedupe ")]
    assert report.matches("dedupe") == 2 and len(dedupe_rows) == 2  # the pass row and one grouped rewrite row
    assert dedupe_rows[1].split()[1:3] == ["1", "(x2)"]
    torch.testing.assert_close(report.output, model(x))


def test_graphs_are_numbered_within_the_report():
    model, x = Blocks().eval(), torch.randn(8, 16)
    with torch.no_grad():
        first = diffopt.explain(model, x)
        report = diffopt.explain(model, x)  # its graph has a later process-wide name
    assert first.graphs != report.graphs
    for text in (str(first), str(report)):
        dedupe_row = [line for line in text.splitlines() if line.startswith("dedupe ")][1]
        assert dedupe_row.split()[1:3] == ["1", "(x2)"]


def test_a_cache_hit_is_logged_and_reported(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, x = Blocks(n=1).eval(), torch.randn(8, 16)
    backend = functools.partial(diffopt_backend, options={})
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False), torch.no_grad():
        torch.compile(model, backend=backend)(x)  # fills the cache
        torch._dynamo.reset()
        report = Report()
        with caplog.at_level(logging.INFO, logger="diffopt"), collecting(report):
            torch.compile(model, backend=backend)(x)
    assert report.cache_hits and "from Inductor's cache" in str(report)
    assert any("FX graph cache hit" in record.getMessage() for record in caplog.records)
