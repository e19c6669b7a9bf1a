"""The shard notebook runs top to bottom on shards made by the test, so it never rots."""
import os


from tests.conftest import ROOT


def test_inspect_shards_notebook_executes(tmp_path, sft_model, train_prompts):
    import nbclient  # the dev extra (make test installs it)
    import nbformat

    from dfgen.mask import MaskConfig, run_mask
    from dfgen.repair import RepairConfig, run_repair
    from dfgen.sample import SampleConfig, run_sample

    run_sample(SampleConfig(prompts=train_prompts, model=sft_model, out=tmp_path / "s", group_size=4, limit=8))
    run_repair(RepairConfig(rollouts=tmp_path / "s", out=tmp_path / "r"))
    run_mask(MaskConfig(repairs=tmp_path / "r", out=tmp_path / "m"))
    nb = nbformat.read(ROOT / "notebooks" / "inspect_shards.ipynb", as_version=4)
    os.environ["DF_SHARDS"] = str(tmp_path / "m")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("DF_SHARDS", None)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
