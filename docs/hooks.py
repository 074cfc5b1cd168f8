"""MkDocs hooks for the fl-defense site (mkdocs.yml: ``hooks:``; excluded from the pages).

- Tables that follow from the code are generated at build time, so they cannot drift from it:
  ``<!-- fl-defense:run-config -->`` becomes the run-config table (``ExperimentConfig.docs()``) and
  ``<!-- fl-defense:defenses -->`` the table of registered defenses (``DEFENSES``).
- ``<!-- fl-defense:api-strategies legacy -->`` (or ``message``) and ``<!-- fl-defense:api-defenses -->``
  become one mkdocstrings block per registered strategy / defense class (the strategy classes are
  generated at import time, so they are listed from the registry, not from the source).
- A link from a page to a file of the repository outside ``docs/`` (the generated reports link
  their grid's TOML file) cannot be followed on the built site; it is written as the file's path
  in code instead. A link to a path that exists nowhere is left alone, so the strict build fails.
"""

from __future__ import annotations

import html
import os
import re

LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")


def _cell(text: str) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|")


def _toml(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)


def run_config_table() -> str:
    from fl_defense.config import ExperimentConfig

    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{k}` | `{_toml(v)}` | {_cell(doc)} |" for k, v, doc in ExperimentConfig.docs()]
    return "\n".join(rows)


def defenses_table(files, page) -> str:
    from fl_defense.defenses import DEFENSES

    here = os.path.dirname(page.file.src_path)
    rows = ["| `defense=` | class | paper | flags clients | needs client Fisher |", "|---|---|---|---|---|"]
    for name, cls in DEFENSES.items():
        target = f"defenses/{name.replace('_', '-')}.md"
        link = os.path.relpath(target, here or ".").replace(os.sep, "/")
        label = f"[{cls.__name__}]({link})" if files.get_file_from_path(target) else cls.__name__
        rows.append(f"| `{name}` | {label} | {_cell(cls.paper)} | {'yes' if cls.detects else 'no'} | "
                    f"{'yes' if cls.needs_fisher else 'no'} |")
    return "\n".join(rows)


def _object_block(path: str) -> str:
    return f"::: {path}\n    options:\n      heading_level: 3\n      members: false\n"


def api_strategies(api: str) -> str:
    import importlib

    module = importlib.import_module(f"fl_defense.strategies.{api}")
    names = ["DefenseStrategy"] + [cls.__name__ for cls in module.STRATEGIES.values()]
    return "\n".join(_object_block(f"{module.__name__}.{name}") for name in names)


def api_defenses() -> str:
    from fl_defense.defenses import DEFENSES

    return "\n".join(_object_block(f"{cls.__module__}.{cls.__qualname__}") for cls in DEFENSES.values())


def _outside_links(markdown: str, page, config) -> str:
    docs_dir = os.path.abspath(config["docs_dir"])
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    page_dir = os.path.join(docs_dir, os.path.dirname(page.file.src_path))

    def repl(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if "://" in target or target.startswith(("#", "mailto:")):
            return m.group(0)
        path = os.path.normpath(os.path.join(page_dir, target.split("#")[0]))
        if path.startswith(docs_dir + os.sep) or not path.startswith(root + os.sep) or not os.path.exists(path):
            return m.group(0)
        rel = os.path.relpath(path, root)
        return f"`{rel}`" if text.strip("`") == rel else f"{text} (`{rel}`)"

    return LINK.sub(repl, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- fl-defense:run-config -->" in markdown:
        markdown = markdown.replace("<!-- fl-defense:run-config -->", run_config_table())
    if "<!-- fl-defense:defenses -->" in markdown:
        markdown = markdown.replace("<!-- fl-defense:defenses -->", defenses_table(files, page))
    for api in ("legacy", "message"):
        marker = f"<!-- fl-defense:api-strategies {api} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, api_strategies(api))
    if "<!-- fl-defense:api-defenses -->" in markdown:
        markdown = markdown.replace("<!-- fl-defense:api-defenses -->", api_defenses())
    return _outside_links(markdown, page, config)
