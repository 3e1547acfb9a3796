"""The flags of ms-swift 2.x's `swift dpo`: the fields of SftArguments and RLHFArguments.

Usage, from an ms-swift git checkout:
    git show v2.6.1:swift/llm/utils/argument.py > /tmp/argument.py
    python tests/golden/swift_flags.py /tmp/argument.py > tests/fixtures/ms_swift/dpo_flags_v2.6.1.txt

tests/it/swift_flags.rs checks that lorafold implements, notes or refuses every one of them.
"""
import ast
import sys


def fields(path, classes):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    names.add(stmt.target.id)
    return sorted(names)


if __name__ == "__main__":
    for name in fields(sys.argv[1], {"SftArguments", "RLHFArguments"}):
        print(name)
