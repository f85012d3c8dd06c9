"""The notebook API (`from esa_pipeline.core import ...`) names the documented objects, whatever was imported first.

Issue 15: importing any core module bound the submodule `esa_pipeline.core.perplexity` on the package, so the
lazy `__getattr__` never ran and `perplexity(...)` raised "'module' object is not callable". The fault kind is an
export whose name equals a submodule; this imports every submodule first, in a fresh process, then checks each
exported name.
"""

import json
import subprocess
import sys

CHECK = """
import importlib, json, pkgutil, types
import esa_pipeline.core as core
for info in pkgutil.walk_packages(core.__path__, "esa_pipeline.core."):
    importlib.import_module(info.name)
report = {}
for name in core.__all__:
    value = getattr(core, name)
    documented = getattr(importlib.import_module(core._EXPORTS[name]), name)
    report[name] = {"is_module": isinstance(value, types.ModuleType), "is_documented": value is documented}
children = sorted(info.name for info in pkgutil.iter_modules(core.__path__))
print(json.dumps({"report": report, "children": children}))
"""


def test_every_export_is_the_documented_object_after_importing_every_submodule():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=300)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    report = data["report"]
    assert {"load_model", "adapter_for", "Perturbation", "perturbed", "load_texts", "perplexity",
            "evaluate_against"} <= set(report)  # fmt: skip
    assert not [name for name, r in report.items() if r["is_module"]], "exports shadowed by a submodule"
    assert all(r["is_documented"] for r in report.values()), report
    # A direct child module of that name would shadow the export again as soon as anything imports it.
    assert not set(report) & set(data["children"])


def test_the_reported_first_call_works_after_core_modules_were_imported():
    # issue 15's input, verbatim, after the import that used to shadow the function with its module
    code = (
        "import math, esa_pipeline.core.evaluation.perplexity, esa_pipeline.core.storage\n"
        "from esa_pipeline.core import load_model, perplexity\n"
        "r = perplexity(load_model('tiny-llama'), ['hello'], window=8)\n"
        "assert r.n_tokens > 0 and math.isfinite(r.token_ppl), r\n"
        "print(r.n_tokens, r.token_ppl)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
