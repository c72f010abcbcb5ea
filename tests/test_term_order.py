"""The critic loss's term order and the token reductions' ids have one source of truth: dvpo/config.py
(TERM_NAMES, PARAM_NAMES, TOKEN_REDUCTIONS).

- csrc/terms.h, which the C++ CPU and CUDA kernels include, is what tools/gen_terms_header.py
  writes from dvpo/config.py (regenerated here in memory and compared with the committed file);
- the Triton critic loss takes the order from dvpo.config (no literal list of names or indices);
- no other C++/CUDA source defines the term count or a term or params index again, and the
  critic-loss kernels index weights, terms and params by the generated names, never by literals.

Cheap (no kernel runs, no build): it reads sources.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

import pytest

from dvpo.config import PARAM_NAMES, TERM_NAMES, TOKEN_REDUCTIONS

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HEADER = CSRC / "terms.h"
TRITON_SRC = ROOT / "kernels" / "critic_loss.py"
# The critic-loss kernels and the CUDA launcher header: weights, terms and params by name only.
KERNEL_FILES = ("cpu/critic_loss.cpp", "cuda/critic_loss.cu", "cuda/dvpo_cuda.h")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_terms_header", ROOT / "tools" / "gen_terms_header.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------ (1) the generated header

def test_generator_reads_the_config_tuples():
    terms, params, reductions = _generator().read_names()
    assert terms == TERM_NAMES and params == PARAM_NAMES and reductions == TOKEN_REDUCTIONS


def test_committed_header_is_up_to_date():
    gen = _generator()
    want = gen.render(*gen.read_names())
    assert HEADER.read_text() == want, "csrc/terms.h is stale: run `python tools/gen_terms_header.py` and rebuild"


def test_header_indices_follow_the_config():
    text = HEADER.read_text()
    defined = dict((name, int(v)) for name, v in re.findall(r"constexpr int (k\w+)\s*=\s*(\d+);", text))
    gen = _generator()
    want = {gen.constant(n): k for k, n in enumerate(PARAM_NAMES)}
    want.update({gen.constant(n): k for k, n in enumerate(TOKEN_REDUCTIONS)})
    want.update(kTerms=len(TERM_NAMES), kParams=len(PARAM_NAMES), kReductions=len(TOKEN_REDUCTIONS))
    assert defined == want
    assert defined["kSeqMeanTokenSum"] == TOKEN_REDUCTIONS.index("seq-mean-token-sum")
    names = re.search(r"kReductionNames\[kReductions\] = \{(.*?)\};", text, re.S).group(1)
    assert tuple(re.findall(r'"([^"]+)"', names)) == TOKEN_REDUCTIONS
    assert defined["kQH"] == 0 and defined["kConsist"] == len(TERM_NAMES) - 1
    assert "do not edit" in text.lower() and "#include" not in text  # generated; torch-free


# ------------------------------------------------------------------------ (2) Triton

def test_triton_source_has_no_literal_order():
    src = TRITON_SRC.read_text()
    assert re.search(r"^from dvpo\.config import .*\bTERM_NAMES\b", src, re.M)
    literal = [
        (r"\bN_TERMS\s*=\s*\d", "a literal term count"),
        (r"\bN_PARAMS\s*=\s*\d", "a literal params count"),
        (r"o_base\s*\+\s*\d", "a term stored at a literal index"),
        (r"\btok\s*\*\s*\d", "a literal terms row stride"),
        (r"range\(\s*8\s*\)", "a loop over a literal 8 terms"),
        (r"\bp\[\s*\d", "params read at a literal index"),
    ]
    found = [(what, m.group(0)) for pat, what in literal for m in re.finditer(pat, src)]
    assert not found, found


def test_triton_module_order_is_the_config_order():
    pytest.importorskip("triton")
    mod = importlib.import_module("dvpo.kernels.critic_loss")
    assert mod.TERM_NAMES is TERM_NAMES and mod.PARAM_NAMES is PARAM_NAMES
    assert mod.N_TERMS == len(TERM_NAMES) and mod.N_PARAMS == len(PARAM_NAMES)
    stores = {name: getattr(mod, f"_{name.upper()}") for name in TERM_NAMES}
    assert [int(getattr(c, "value", c)) for c in stores.values()] == list(range(len(TERM_NAMES)))
    assert int(getattr(mod._N_TERMS, "value", mod._N_TERMS)) == len(TERM_NAMES)
    # the launcher passes the weights to the kernel's w_<name>_ arguments by name
    assert sorted(mod.KERNEL_WEIGHT_ORDER) == sorted(TERM_NAMES)
    assert mod.KERNEL_WEIGHT_ORDER == TERM_NAMES
    params = (mod._TAIL_MODE, mod._LO_SCALE, mod._HI_SCALE, mod._SHIFT_EXPECTILE)
    assert [PARAM_NAMES[k] for k in params] == ["tail_mode", "lo_scale", "hi_scale", "shift_expectile"]


# ------------------------------------------------------------------------ (3) C++ and CUDA sources

_CODE_NOISE = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)


def _code(text: str) -> str:
    """The source without comments and string/char literals (newlines kept, for line numbers)."""
    return _CODE_NOISE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _names_pattern() -> str:
    # the generated constants in any capitalization (kQH, kQh, KQH...) and the other spellings of a count
    flat = sorted({n.replace("_", "") for n in PARAM_NAMES} | {"terms", "params"})
    return (r"(?:\bk_?(?:" + "|".join(flat) + r")\b"
            r"|\b\w*(?:n_?terms|num_?terms|terms?_?count|n_?params|num_?params|params?_?count)\b)")


def _definitions(code: str):
    """(line, text) of each definition of a term/params index or count in C++ code."""
    names = _names_pattern()
    pats = [
        re.compile(names + r"\s*=(?!=)", re.I),                                  # x = ... / enum { kQh = 0 }
        re.compile(r"#\s*define\s+" + names, re.I),                               # #define kTerms 8
        re.compile(r"\benum\b[^{;]*\{[^}]*" + names, re.I | re.S),                # enum { ..., kTerms }
        re.compile(r"\b(?:constexpr|const)\b[^;(){}=]*?" + names + r"\s*[{(]", re.I),  # constexpr int kTerms{8}
    ]
    out = []
    for pat in pats:
        for m in pat.finditer(code):
            out.append((code.count("\n", 0, m.start()) + 1, m.group(0).strip()))
    return out


_LITERAL_INDEX = re.compile(r"\b(?:w|term|terms|weights|params|out_terms|terms_out)\s*\[\s*\d+\s*\]"
                            r"|\bterms\s*\+\s*tok\s*\*\s*\d", re.I)


def _sources():
    return sorted(p for ext in ("*.h", "*.cuh", "*.cpp", "*.cu") for p in CSRC.rglob(ext) if p != HEADER)


def test_scanner_catches_definitions_and_literal_indices():
    """The checks below are not vacuous: they flag the forms the kernels used before csrc/terms.h."""
    for snippet in ["constexpr int kTerms = 8;", "constexpr size_t kParams = 12;", "#define KTERMS 8",
                    "enum Term { kQh = 0, kRisk, kCvar, kGain, kShift, kShape, kCurv, kConsist, kTerms };",
                    "static const int kTailMode{8};", "int n_terms = 8;", "constexpr int kShiftExpectile = 11;"]:
        assert _definitions(_code(snippet)), snippet
    for snippet in ["if (a.w[2] != T(0))", "term[7] = x;", "params[8]", "p.terms + tok * 8"]:
        assert _LITERAL_INDEX.search(_code(snippet)), snippet
    for snippet in ["// constexpr int kTerms = 8;", 'TORCH_CHECK(x, "kTerms = 8");', "w[kCvar] != acc(0)",
                    "for (int t = 0; t < kTerms; ++t)", "if (params.size() == kParams)"]:
        code = _code(snippet)
        assert not _definitions(code) and not _LITERAL_INDEX.search(code), snippet


def test_sources_define_the_order_only_in_the_generated_header():
    assert _sources(), "no C++ sources found under csrc/"
    found = []
    for path in _sources():
        for line, text in _definitions(_code(path.read_text())):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text}")
    assert not found, "term/params indices or counts defined outside csrc/terms.h:\n" + "\n".join(found)


@pytest.mark.parametrize("rel", KERNEL_FILES)
def test_kernels_use_the_generated_names(rel):
    path = CSRC / rel
    text = path.read_text()
    assert re.search(r'#include "(?:\.\./)?terms\.h"', text), f"{rel} does not include terms.h"
    code = _code(text)
    found = [f"{rel}:{code.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in _LITERAL_INDEX.finditer(code)]
    assert not found, "literal term/params indices (use the csrc/terms.h names):\n" + "\n".join(found)
    for name in ("kQH", "kCvar", "kShape", "kConsist", "kTerms"):
        if rel != "cuda/dvpo_cuda.h":
            assert re.search(rf"\b{name}\b", code), f"{rel} does not use {name}"


def test_reduction_names_only_in_the_generated_header():
    """The bindings parse `reduction` with math::reduction_id over terms.h's names; no other C++ source
    spells a name or maps one to an id."""
    found = [f"{p.relative_to(ROOT)}: {n}" for p in _sources() for n in TOKEN_REDUCTIONS if f'"{n}"' in p.read_text()]
    assert not found, "reduction names outside csrc/terms.h:\n" + "\n".join(found)
    for rel in ("cpu/reduce_tokens.cpp", "cuda/bindings.cpp"):
        assert "math::reduction_id(" in (CSRC / rel).read_text(), f"{rel} does not parse with math::reduction_id"


def test_triton_reduction_ids_are_the_config_order():
    pytest.importorskip("triton")
    mod = importlib.import_module("dvpo.kernels.reduce_tokens")
    assert mod.REDUCTIONS == {n: k for k, n in enumerate(TOKEN_REDUCTIONS)}
    for const, name in ((mod._TOKEN_MEAN, "token-mean"), (mod._SEQ_MEAN_TOKEN_MEAN, "seq-mean-token-mean")):
        assert int(getattr(const, "value", const)) == TOKEN_REDUCTIONS.index(name)
    assert not re.search(r"RED\s*==\s*\d", (ROOT / "kernels" / "reduce_tokens.py").read_text())


def test_cuda_kernel_files_are_torch_free():
    torch_include = re.compile(r"#\s*include\s*[<\"](?:torch|ATen|c10)/")
    files = [HEADER, CSRC / "cuda" / "dvpo_cuda.h"] + sorted((CSRC / "cuda").glob("*.cu")) + sorted(
        (CSRC / "cuda").glob("*.cuh"))
    found = [str(p.relative_to(ROOT)) for p in files if torch_include.search(p.read_text())]
    assert not found, f"torch headers in torch-free kernel files: {found}"


def test_cuda_binding_uses_the_generated_names():
    code = _code((CSRC / "cuda" / "bindings.cpp").read_text())
    literal = _LITERAL_INDEX.findall(code) + re.findall(r"params\.size\(\)\s*==\s*\d+|\bk\s*<\s*8\b|\{\s*T\s*,\s*8\s*\}",
                                                        code)
    assert not literal, literal
