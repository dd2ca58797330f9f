"""The tutorial (docs/tutorial/) is checked, not just written: its Python blocks run in
order page by page, its C++ blocks and its quoted Python blocks (```py) are quotes that
must still be in csrc/ and batchnorm_ext/, its figures exist and their scripts work, and
its links lead somewhere."""
import os
import pathlib
import re
import sys

import pytest

from helpers import available_capabilities

ROOT = pathlib.Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial"
PAGES = sorted(TUTORIAL.glob("[0-9][0-9]-*.md"))
# Quoted blocks: the fence's language, and where the quoted files are.
QUOTED = {"cpp": "csrc/", "py": "batchnorm_ext/"}


def test_all_pages_are_there():
    assert [p.name[:2] for p in PAGES] == [f"{i:02d}" for i in range(1, 12)]
    index = (TUTORIAL / "README.md").read_text()
    for page in PAGES:
        assert f"({page.name})" in index
    assert "docs/tutorial/README.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run_in_order(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    namespace = {"__name__": f"tutorial_{page.stem}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}, Python block {i + 1}", "exec"), namespace)


def quoted_excerpts():
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```(cpp|py)\n((?:(?!```).)*)```\n\n<sub>`([^`]+)`</sub>", text, re.S):
            yield pytest.param(page.name, match.group(1), match.group(2), match.group(3),
                               id=f"{page.name}:{match.group(2).splitlines()[0][:40]}")


@pytest.mark.parametrize("page,language,excerpt,source", list(quoted_excerpts()))
def test_quoted_blocks_are_quotes_of_the_sources(page, language, excerpt, source):
    assert source.startswith(QUOTED[language]), source
    assert excerpt in (ROOT / source).read_text(), f"{page}: the quote from {source} is no longer in it"


def test_every_quoted_block_names_its_source():
    """Every ```cpp block quotes csrc/ and every ```py block batchnorm_ext/ (```python blocks
    run instead)."""
    for page in PAGES:
        text = page.read_text()
        for language, folder in QUOTED.items():
            named = re.findall(rf"```{language}\n(?:(?!```).)*```\n\n<sub>`{folder}[^`]+`</sub>", text, re.S)
            assert text.count(f"```{language}\n") == len(named), (page.name, language)


def test_links_and_figures_exist():
    for page in [TUTORIAL / "README.md", *PAGES]:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links, not code
        for target in re.findall(r"\]\(([^)#]+)\)", prose):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_figure_script_makes_the_figure(tmp_path):
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import make_figures
    finally:
        sys.path.pop(0)
    errors = make_figures.variance_error(tmp_path / "variance_error.png")
    assert (tmp_path / "variance_error.png").stat().st_size > 1000
    # What page 2 says the figure shows: naive fails by 1e4, ours stays at float32 rounding.
    assert errors["naive E[x²] − E[x]²"][4] > 0.5
    assert max(errors["batchnorm_ext (blocks + Chan)"]) < 1e-6


def _steps_block(text):
    return re.search(r"<!-- steps -->\n(.*?)\n<!-- /steps -->", text, re.S).group(1).strip()


def test_measured_table_is_the_one_on_page_6():
    table = (TUTORIAL / "figures" / "steps.md").read_text().strip()
    assert _steps_block((TUTORIAL / "06-making-it-fast.md").read_text()) == table


CELL = re.compile(r"(\d+\.\d\d) ms(?: \((\d+\.\d)x\))?")


def test_page_6_table_is_what_measure_steps_makes_of_its_numbers(tmp_path, monkeypatch):
    """Runs docs/tutorial/figures/measure_steps.py with its timer replaced by one that
    returns the times on page 6 (each call still runs what it would time, once), into a
    copy of the page.  The table it writes must be the page's: same builds, cases, times,
    and speed-ups that follow from the times (within the rounding of the times shown);
    and what the prose says of it must hold."""
    import io
    import torch
    import batchnorm_ext
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import measure_steps
    finally:
        sys.path.pop(0)
    page_text = (TUTORIAL / "06-making-it-fast.md").read_text()
    shown = _steps_block(page_text).splitlines()
    header, rows = shown[0], [line for line in shown[2:] if line.startswith("| ")]
    builds = re.findall(r"ours, (\w+)", header)
    times = [[float(t) for t, _ in CELL.findall(row)] for row in rows]
    assert len(rows) == len(measure_steps.CASES) and all(len(t) == 1 + len(builds) for t in times)

    # The timer: the page's times, in the order the script takes them (per case, rounds of
    # native then each build); each function runs once (the first round) to show it works.
    order = iter([(i, j, rnd) for i in range(len(rows)) for rnd in range(3)
                  for j in range(1 + len(builds))])

    def page_time(fn):
        i, j, rnd = next(order)
        if rnd == 0:
            fn()
        return times[i][j]

    # The CPU the page was measured on had the builds it shows; the CPU here runs the
    # builds it has (the times are the page's anyway).
    available = available_capabilities()

    class Builds:
        BatchNorm2d = batchnorm_ext.BatchNorm2d

        @staticmethod
        def cpu_capability():
            return builds[-1]

        @staticmethod
        def set_cpu_capability(name):
            batchnorm_ext.set_cpu_capability(name if name in available else available[0])

    version, cpu = re.search(r"torch (\S+), (.+?), 1 thread", shown[-1]).groups()
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO(f"model name\t: {cpu}\n")
        return real_open(path, *args, **kwargs)

    page_copy = tmp_path / "06-making-it-fast.md"
    page_copy.write_text(page_text.replace(_steps_block(page_text), "(to be measured)"))
    monkeypatch.setattr(measure_steps, "median_ms", page_time)
    monkeypatch.setattr(measure_steps, "batchnorm_ext", Builds)
    monkeypatch.setattr(measure_steps, "HERE", str(tmp_path))
    monkeypatch.setattr(measure_steps, "PAGE", str(page_copy))
    monkeypatch.setattr(measure_steps, "open", fake_open, raising=False)
    monkeypatch.setattr(torch, "__version__", version)
    threads, capability = torch.get_num_threads(), batchnorm_ext.cpu_capability()
    try:
        measure_steps.main()
    finally:
        torch.set_num_threads(threads)
        batchnorm_ext.set_cpu_capability(capability)
    made = (tmp_path / "steps.md").read_text().strip()
    assert _steps_block(page_copy.read_text()) == made

    # Equal but for the speed-ups, which the script computes from unrounded times.
    without_ratios = lambda text: re.sub(r" \(\d+\.\dx\)", "", text)
    assert without_ratios(made) == without_ratios(_steps_block(page_text))
    for row in rows:
        cells = CELL.findall(row)
        native = float(cells[0][0])
        for ours, ratio in cells[1:]:
            ours = float(ours)
            low, high = (native - 0.005) / (ours + 0.005), (native + 0.005) / (ours - 0.005)
            assert low - 0.05 <= float(ratio) <= high + 0.05, (row, ours, ratio)

    # "Channels-last with C = 3 is where native is weakest": the largest speed-ups.
    assert "Channels-last with C = 3 is where native is weakest" in page_text
    c3 = next(i for i, (shape, layout) in enumerate(measure_steps.CASES)
              if shape[1] == 3 and layout == "nhwc")
    for j in range(1, 1 + len(builds)):
        assert max(range(len(rows)), key=lambda i: times[i][0] / times[i][j]) == c3


def test_measure_steps_timer_times():
    """The timer measure_steps.py uses (the one the test above replaces) gives a time."""
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import measure_steps
    finally:
        sys.path.pop(0)
    import torch
    threads = torch.get_num_threads()
    x = torch.randn(1000)
    try:
        assert 0 < measure_steps.median_ms(lambda: x.sum()) < 100
    finally:
        torch.set_num_threads(threads)


def _fused_block(text):
    return re.search(r"<!-- fused -->\n(.*?)\n<!-- /fused -->", text, re.S).group(1).strip()


def test_measured_table_is_the_one_on_page_10():
    table = (TUTORIAL / "figures" / "fused.md").read_text().strip()
    assert _fused_block((TUTORIAL / "10-fused-epilogues.md").read_text()) == table


FUSED_CELL = re.compile(r"(\d+\.\d\d) ms(?: \((\d+\.\d\d)x\))?")


def test_page_10_table_is_what_measure_fused_makes_of_its_numbers(tmp_path, monkeypatch):
    """As for page 6: runs docs/tutorial/figures/measure_fused.py with its timer replaced by
    one that returns the times on page 10, into a copy of the page.  The script still builds
    every case and runs each variant once (its check against native, before timing).  The
    table it writes must be the page's: same cases, shapes, times, and speed-ups that follow
    from the times (within the rounding of the times shown); and what the prose says of it
    must hold."""
    import io
    import torch
    import batchnorm_ext
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import measure_fused
    finally:
        sys.path.pop(0)
    page_text = (TUTORIAL / "10-fused-epilogues.md").read_text()
    shown = _fused_block(page_text).splitlines()
    header, rows = shown[0], [line for line in shown[2:] if line.startswith("| ")]
    assert header == "| forward + backward | shape | " + " | ".join(measure_fused.VARIANTS) + " |"
    times = [[float(t) for t, _ in FUSED_CELL.findall(row)] for row in rows]
    assert len(rows) == len(measure_fused.CASES)
    assert all(len(t) == len(measure_fused.VARIANTS) for t in times)

    # The timer: the page's times, in the order the script takes them (per case, rounds of
    # each variant in turn).  Each variant has run once already, in the script's check.
    order = iter([(i, j) for i in range(len(rows)) for _ in range(measure_fused.ROUNDS)
                  for j in range(len(measure_fused.VARIANTS))])

    def page_time(fn):
        i, j = next(order)
        return times[i][j]

    version, cpu, capability = re.search(r"torch (\S+), (.+?), kernels (\S+), 1 thread",
                                         shown[-1]).groups()
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO(f"model name\t: {cpu}\n")
        return real_open(path, *args, **kwargs)

    page_copy = tmp_path / "10-fused-epilogues.md"
    page_copy.write_text(page_text.replace(_fused_block(page_text), "(to be measured)"))
    monkeypatch.setattr(measure_fused, "median_ms", page_time)
    monkeypatch.setattr(measure_fused, "HERE", str(tmp_path))
    monkeypatch.setattr(measure_fused, "PAGE", str(page_copy))
    monkeypatch.setattr(measure_fused, "open", fake_open, raising=False)
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(batchnorm_ext, "cpu_capability", lambda: capability)
    threads = torch.get_num_threads()
    try:
        measure_fused.main()
    finally:
        torch.set_num_threads(threads)
    assert next(order, None) is None  # every time taken
    made = (tmp_path / "fused.md").read_text().strip()
    assert _fused_block(page_copy.read_text()) == made

    # Equal but for the speed-ups, which the script computes from unrounded times.
    without_ratios = lambda text: re.sub(r" \(\d+\.\d\dx\)", "", text)
    assert without_ratios(made) == without_ratios(_fused_block(page_text))
    for row in rows:
        cells = FUSED_CELL.findall(row)
        native = float(cells[0][0])
        for ours, ratio in cells[1:]:
            ours = float(ours)
            low, high = (native - 0.005) / (ours + 0.005), (native + 0.005) / (ours - 0.005)
            assert low - 0.005 <= float(ratio) <= high + 0.005, (row, ours, ratio)

    # "Both layers are faster than native's, fused or not, and fusing gains less over the
    # unfused layers than the byte count allows" (the bounds are the page's: 40 / 24, 52 / 32).
    assert "Both layers are faster than native's, fused or not, and fusing gains less over " \
        "the\nunfused layers than the byte count allows." in page_text
    bounds = re.findall(r"(\d+) / (\d+) = (\d\.\d\d)", page_text)
    assert [(a, b) for a, b, _ in bounds] == [("40", "24"), ("52", "32")]
    assert [what for what, _ in measure_fused.CASES[:2]] == ["BN → ReLU", "BN → add → ReLU"]
    for (a, b, shown_bound), row, (what, _) in zip(bounds, times, measure_fused.CASES):
        assert abs(int(a) / int(b) - float(shown_bound)) <= 0.005  # rounded
        native, ours, fused = row
        assert native > ours and native > fused, what
        assert ours / fused < int(a) / int(b), what
