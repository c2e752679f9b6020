"""`tandem models`: list model versions, promote one, roll back to the parent."""

from __future__ import annotations

from typing import Annotated

import typer

from backend.cli.common import Home, app, console, stdout_console, stores
from backend.core.text import shortlist

models_app = typer.Typer(help="Model versions: list, promote, rollback; bind a project to its own models.",
                        no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(home: Home = None) -> None:
    """Every version: the server's default CNN and VLM (▶), promoted or rejected, its score against its parent's;
    a project's own versions name the project, and a version bound to a project (what serves it) is marked ▷;
    "serves now" says whom ("promoted" is the gate's verdict, kept after a later version replaced it).
    Below, each project's binding, files and hub ids included (they are not registry versions)."""
    from rich.table import Table

    from backend.storage.projects import ProjectRepo

    settings, registry, _ = stores(home)
    defaults = {v.version for v in (registry.current("cnn"), registry.current("vlm")) if v}
    states = ProjectRepo(settings.database_url).bound()
    bound: dict[str, list[str]] = {}  # version -> "project N" for each project whose binding names it
    for s in states:
        for spec in (s.model, s.second_opinion):
            found = registry.resolve(spec)
            if found:
                bound.setdefault(found.version, []).append(f"project {s.project_id}")
    table = Table(title="Tandem model versions")
    for col in ("", "version", "task", "project", "status", "serves now", "fitness", "serving fitness", "parent",
                "dataset", "created"):
        table.add_column(col)
    import time as _t

    def score(metrics: dict) -> str:  # YOLO: fitness (mAP50-95 / top-1) on the frozen split; VLM LoRA: its loss
        if "fitness" in metrics:
            return f"{metrics['fitness']:.4f}"
        return f"loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""

    gone = []
    for v in registry.versions():
        cand, serv = v.metrics.get("candidate", {}), v.metrics.get("serving", {})
        mark = "▶" if v.version in defaults else ("▷" if v.version in bound else "")
        serves = ", ".join([*(["default"] if v.version in defaults else []), *bound.get(v.version, [])])
        damage = weights_damage(v.path)
        if damage:
            gone.append(v.version)
        table.add_row(mark, v.version, v.task, "" if v.project_id is None else str(v.project_id),
                      v.status + (f" [red]({damage})[/]" if damage else ""), serves,
                      score(cand), score(serv),
                      v.parent or "", v.dataset or "", _t.strftime("%Y-%m-%d %H:%M", _t.localtime(v.created_at)))
    out = stdout_console()
    out.print(table)
    if gone:
        out.print(f"[red]{len(gone)} version(s) cannot be served from this machine[/] ({shortlist(gone)}): their "
                  "weights are missing or empty here; `tandem models promote` and `bind` refuse them, and a "
                  "server that served one falls back to the promotion before it or its default")
    if not states:
        return
    out.print("▶ the server's default CNN / VLM; ▷ bound to a project (what serves it)")

    def shown(spec: str | None) -> str:  # a registry version by name; a file or hub id as it is bound
        found = registry.resolve(spec)
        return found.version if found else (spec or "server default")

    bindings = Table(title="Project bindings (tandem models bind)")
    for col in ("project", "model", "second opinion", "pre-annotator"):
        bindings.add_column(col)
    for s in sorted(states, key=lambda s: s.project_id):
        bindings.add_row(str(s.project_id), shown(s.model), shown(s.second_opinion),
                         s.pre_annotator or "server default")
    out.print(bindings)


def weights_damage(path: str | None) -> str | None:
    """Why a version's weights cannot load here, where that is cheap to know: an absolute path (what the local
    artifact store records) that is gone or empty. Hub names and remote URLs are not fetched to find out."""
    from backend.storage.artifacts import local_file

    local = local_file(path) if path else None  # None for remote URLs
    if local is None or not local.is_absolute():
        return None  # a hub name such as yolov8n.pt
    if not local.exists():
        return "weights missing"
    if (local.is_file() and local.stat().st_size == 0) or (local.is_dir() and not any(local.iterdir())):
        return "weights empty"
    return None


def _require_loadable(found, settings) -> None:
    """Never serve weights that do not load: a YOLO file through the YOLO adapter, a VLM (or LoRA) folder as
    the server would load it."""
    from backend.errors import TandemError
    from backend.storage.artifacts import localise

    try:
        path = localise(settings, found.path)  # an artifact URL is fetched into this machine's cache
        if found.kind == "vlm":
            from backend.models.vlm.loader import load_vlm

            console.print(f"checking that {found.version} loads ({found.path})…")
            load_vlm(path, device="cpu")
        else:
            from backend.models.yolo import YoloAdapter

            YoloAdapter(path, device="cpu")
    except TandemError as exc:
        console.print(f"[red]error:[/] {found.version}: {exc}")
        raise typer.Exit(2) from exc


def _require_spec_loads(spec: str, settings) -> None:
    """A file or folder bound to a project loads here as the server would load it (on the CPU), or the binding
    is refused: a server would otherwise fall back to its defaults at the project's next request, in a log line
    nobody reads. Hub ids are not fetched here; registry versions were checked when they were made."""
    from pathlib import Path

    from backend.errors import TandemError
    from backend.server.projects import load_spec

    path = Path(spec).expanduser()
    if path.is_dir():
        console.print(f"checking that {spec} loads…")
    try:
        # the file is checked, not the engine: no OpenVINO export (minutes of output) made just to check it
        load_spec(settings.model_copy(update={"device": "cpu", "engine": "torch"}), None, str(path))
    except TandemError as exc:
        console.print(f"[red]error:[/] not bound: {exc}")
        raise typer.Exit(2) from exc


@models_app.command("promote")
def models_promote(
    version: str,
    project: Annotated[int | None, typer.Option("--project", "-p", help="Serve VERSION to this project only (its "
                                                "binding), not as the server's default.")] = None,
    home: Home = None,
) -> None:
    """Serve VERSION now, a CNN or a VLM version (a running server swaps within seconds). A project's own
    retrain goes into that project's binding; --project puts any version into one project's binding."""
    settings, registry, _ = stores(home)
    found = registry.get(version)
    if found is None or not found.path:
        console.print(f"[red]error:[/] no version {version} (tandem models list shows them)")
        raise typer.Exit(2)
    if found.kind == "second" and project is None:
        console.print(f"[red]error:[/] {version} is served as a second opinion, not a CNN or VLM version: serve it "
                      "with tandem serve --model, or bind it to a project (tandem models promote --project, or "
                      "tandem models bind)")
        raise typer.Exit(2)
    target = found.project_id if project is None else project
    if project is not None and found.project_id not in (None, project):
        console.print(f"[yellow]note:[/] {version} was trained for project {found.project_id}; serving it to "
                      f"project {project} too")
    _require_loadable(found, settings)
    if found.status == "rejected":  # allowed (the gate can be wrong, e.g. on a frozen split of accepted boxes): said
        cand, serv = found.metrics.get("candidate", {}), found.metrics.get("serving", {})
        scores = (f" (frozen split fitness {cand['fitness']:.4f} against the serving model's {serv['fitness']:.4f})"
                  if "fitness" in cand and "fitness" in serv else "")
        console.print(f"[yellow]note:[/] the gate had rejected {version}{scores}; promoting it anyway")
    if target is None:
        registry.set_status(version, "promoted")
        console.print(f"{version} promoted")
        return
    from backend.storage.projects import ProjectRepo

    projects = ProjectRepo(settings.database_url)
    if projects.get(target) is None:  # allowed (bind before connecting), said: a wrong id would pass unnoticed
        console.print(f"[yellow]note:[/] project {target} has not connected to a server with this database yet "
                      f"(TANDEM_HOME {settings.home}); the binding applies once it does")
    if found.project_id == target:  # a server-wide version's status would make it every project's default
        registry.set_status(version, "promoted")
    role = "model" if found.kind == "cnn" else "second_opinion"  # a VLM (LoRA) or YOLO second opinion
    projects.update(target, **{role: version})
    console.print(f"{version} promoted for project {target} (its binding's {role.replace('_', ' ')}; "
                  "other projects keep theirs)")


@models_app.command("rollback")
def models_rollback(
    vlm: Annotated[bool, typer.Option("--vlm", help="Roll back the VLM (its LoRA versions) instead of the CNN.")] = False,
    project: Annotated[int | None, typer.Option("--project", "-p", help="Roll back this project's binding (where "
                                                "its retrains are promoted) instead of the server's default.")
                       ] = None,
    home: Home = None,
) -> None:
    """Serve the parent of the current CNN version (or, with --vlm, of the current VLM version) again."""
    settings, registry, _ = stores(home)
    kind = "vlm" if vlm else "cnn"
    role = "second_opinion" if vlm else "model"
    projects = None
    if project is not None:
        from backend.storage.projects import ProjectRepo

        projects = ProjectRepo(settings.database_url)
        state = projects.get(project)
        spec = getattr(state, role, None) if state else None
        current = registry.resolve(spec) if spec else None
        if current is None:
            console.print(f"[red]error:[/] project {project} has no {kind.upper()} version bound "
                          f"({spec or 'it serves the defaults'}): nothing to roll back")
            raise typer.Exit(2)
    else:
        current = registry.current(kind)
    parent = registry.get(current.parent) if current and current.parent else None
    if parent is None or not parent.path:
        where = f"project {project}'s" if project is not None else "the current"
        console.print(f"[red]error:[/] {where} {kind.upper()} version "
                      f"{current.version if current else '(none)'} has no parent to roll back to")
        raise typer.Exit(2)
    _require_loadable(parent, settings)
    if projects is not None:
        projects.update(project, **{role: parent.version})
    else:
        registry.set_status(parent.version, "promoted")
    if projects is None or current.project_id == project:  # a shared or default version stays as it is elsewhere
        registry.set_status(current.version, "rolled back")  # not "rejected": the gate had promoted it
    console.print(f"rolled back from {current.version} to {parent.version}"
                  + (f" for project {project}" if projects is not None else ""))


@models_app.command("bind")
def models_bind(
    project: Annotated[int, typer.Option("--project", "-p", help="Label Studio project id.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="The project's CNN: YOLO weights or a registry "
                                              "version (tandem models list).")] = None,
    second_opinion: Annotated[str | None, typer.Option(help="The project's second opinion: a VLM hub id or "
                                                       "save_pretrained folder, or other YOLO weights.")] = None,
    pre_annotator: Annotated[str | None, typer.Option(help="Whose predictions the project's annotators see: "
                                                      "cnn or vlm (the second opinion).")] = None,
    clear: Annotated[bool, typer.Option(help="Remove the project's binding: it gets the server's defaults.")] = False,
    home: Home = None,
) -> None:
    """Bind a project to its own models (as the backend's extra params {"model": …} do in Label Studio).

    A running server picks the binding up at the project's next request, loading the model in the background;
    a retrain on the project promotes into this binding only."""
    from pathlib import Path

    from backend.cli.common import load_settings
    from backend.storage.projects import ProjectRepo

    settings = load_settings(home=home)
    _, registry, _ = stores(home)
    if pre_annotator not in (None, "cnn", "vlm"):
        raise typer.BadParameter("--pre-annotator must be cnn or vlm")
    for spec in (model, second_opinion):
        if spec and registry.get(spec) is None and not Path(spec).expanduser().exists() and "/" not in spec:
            console.print(f"[red]error:[/] {spec} is neither a registry version (tandem models list) nor a file or "
                          "folder here, nor a hub id")
            raise typer.Exit(2)
        if spec and registry.get(spec) is None and Path(spec).expanduser().exists():
            _require_spec_loads(spec, settings)
        if spec and (found := registry.get(spec)) is not None:  # its weights may be gone or damaged since
            _require_loadable(found, settings)
    projects = ProjectRepo(settings.database_url)
    if clear:
        projects.update(project, model=None, second_opinion=None, pre_annotator=None)
        console.print(f"project {project}: binding removed; it gets the server's default models")
        return
    current = projects.get(project)
    if not (model or second_opinion or pre_annotator):
        if current is None:
            console.print(f"project {project} has not connected to a server with this database (TANDEM_HOME "
                          f"{settings.home}): no binding; it would get the server's default models")
            return
        import json

        stdout_console().print(
            f"project {project}: model={current.model or 'server default'} "
            f"second_opinion={current.second_opinion or 'server default'} "
            f"pre_annotator={current.pre_annotator or 'server default'}")
        for name, value in (("label_map", current.label_map), ("prompts", current.prompts)):
            if value:  # from the ML backend's extra params, as Label Studio last sent them
                stdout_console().print(f"  {name} (extra params): {json.dumps(value, ensure_ascii=False)}")
        return
    if current is None:  # allowed (bind before connecting), said: a wrong id would otherwise pass unnoticed
        console.print(f"[yellow]note:[/] project {project} has not connected to a server with this database yet "
                      f"(TANDEM_HOME {settings.home}); the binding applies once it does")

    def resolved(spec: str | None) -> str | None:
        return str(Path(spec).expanduser().resolve()) if spec and Path(spec).expanduser().exists() else spec

    changes = {k: v for k, v in (("model", resolved(model)), ("second_opinion", resolved(second_opinion)),
                                 ("pre_annotator", pre_annotator)) if v is not None}
    state = projects.update(project, **changes)
    console.print(f"project {project} bound: model={state.model or 'server default'} "
                  f"second_opinion={state.second_opinion or 'server default'} "
                  f"pre_annotator={state.pre_annotator or 'server default'}")
