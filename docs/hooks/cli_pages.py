"""mkdocs hook: a page per segcli command, generated from the CLI itself (its click command tree),
so `--help` is the single source of every option's name, type, default and help.

Each command's page is `commands/<name>.md`; a hand-written `docs/commands/<name>.md` (prose,
examples) is kept, and its `<!-- options -->` marker is replaced by the generated usage and
options. Commands without one get a generated page; the nav's "Commands" section lists them all.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

MARKER = "<!-- options -->"
DOCS = Path(__file__).resolve().parents[1]


def _commands():
    """[(page name, "segcli ...", click command)] in the order `segcli --help` lists them."""
    import typer.main

    from segcli.cli.root import app

    root = typer.main.get_command(app)
    found = []
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):  # a group: `segcli data get`, ...
            for sub_name, sub in cmd.commands.items():
                found.append((f"{name}-{sub_name}", f"segcli {name} {sub_name}", sub))
        else:
            found.append((name, f"segcli {name}", cmd))
    return found


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _kind(param) -> str:
    """What an option takes, as words: integer, number, text, path; with its range."""
    annotation = param.type_descriptor.annotation
    kind = {int: "integer", float: "number", str: "text"}.get(annotation, getattr(annotation, "__name__", "text").lower())
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and high is not None:
        return f"{kind} {low}–{high}"
    if low is not None:
        return f"{kind} ≥ {low}"
    return kind + (f" ≤ {high}" if high is not None else "")


def _options(title: str, cmd) -> str:
    """The usage line, the command's help and a table of its arguments and options."""
    args = " ".join(p.name.upper() + ("..." if p.nargs == -1 else "") for p in cmd.params
                    if p.param_type_name == "argument")
    lines = [f"```\n{title} [OPTIONS] {args}\n```", "", _cell(cmd.help or ""), ""]
    rows = []
    for p in cmd.params:
        if p.param_type_name == "argument":
            rows.append((f"`{p.name.upper()}`", "argument", "", _cell(getattr(p, "help", "") or "")))
            continue
        if p.hidden:
            continue
        flags = ", ".join(f"`{f}`" for f in [*p.opts, *p.secondary_opts])
        kind = "flag" if p.is_flag else _kind(p)
        default = "" if p.default is None or p.is_flag and not p.default or p.required else f"`{p.default}`"
        if p.required:
            default = "required"
        rows.append((flags, kind, default, _cell(p.help or "")))
    lines += ["| option | takes | default | what |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def on_config(config):
    """Fill the nav's "Commands" section with every command's page."""
    pages = [{title: f"commands/{name}.md"} for name, title, _ in _commands()]
    for entry in config["nav"]:
        if isinstance(entry, dict) and "Commands" in entry:
            entry["Commands"] = pages
    return config


def on_files(files, config):
    for name, title, cmd in _commands():
        src = f"commands/{name}.md"
        written = DOCS / src
        prose = written.read_text() if written.exists() else f"# `{title}`\n\n{MARKER}\n"
        if MARKER not in prose:
            raise ValueError(f"{written} has no {MARKER} marker for the generated options")
        content = prose.replace(MARKER, "## Usage and options\n\n" + _options(title, cmd))
        existing = files.get_file_from_path(src)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, src, content=content))
    return files
