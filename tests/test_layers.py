"""The import graph of timm_ferkd goes one way (docs/architecture.md); checked on the source with ``ast``."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = 'timm_ferkd'
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# (importer prefix, forbidden target prefixes)
FORBIDDEN = [
    ('timm_ferkd.bank', ('timm_ferkd.data', 'timm_ferkd.labelling', 'timm_ferkd.losses', 'timm_ferkd.task',
                         'timm_ferkd.cli', 'timm_ferkd.registration', 'timm_ferkd.demo', 'timm_ferkd.runs')),
    ('timm_ferkd.data', ('timm_ferkd.labelling', 'timm_ferkd.task', 'timm_ferkd.cli', 'timm_ferkd.demo')),
    ('timm_ferkd.losses', ('timm_ferkd.bank', 'timm_ferkd.data', 'timm_ferkd.labelling', 'timm_ferkd.task')),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _import_graph() -> Dict[str, Set[str]]:
    """Module -> the timm_ferkd modules it imports anywhere in its body (function-level included)."""
    files = {_module_name(p): p for p in ROOT.rglob('*.py')}
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        is_package = path.name == '__init__.py'
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = name.split('.')[:len(name.split('.')) - node.level + (1 if is_package else 0)]
                    base = '.'.join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f'{base}.{alias.name}'
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + '.')


def test_graph_sees_function_level_imports():
    graph = _import_graph()
    assert 'timm_ferkd.bank.reader' in graph['timm_ferkd.bank.hub']  # imported inside open_bank
    assert 'timm_ferkd.labelling.generate' in graph['timm_ferkd.cli.generate']


def test_no_import_cycle():
    cycle = _find_cycle(_import_graph())
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('importer, forbidden', FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_layers_go_one_way(importer, forbidden):
    bad = sorted(f'{m} -> {t}' for m, targets in _import_graph().items() if _within(m, importer)
                 for t in targets if any(_within(t, f) for f in forbidden))
    assert not bad, 'imports against the layers: ' + ', '.join(bad)


@pytest.mark.parametrize('package', ['timm_ferkd', 'timm_ferkd.bank', 'timm_ferkd.data', 'timm_ferkd.labelling'])
def test_public_names_resolve(package):
    import importlib
    module = importlib.import_module(package)
    assert set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None
