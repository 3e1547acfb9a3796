"""The flags of ms-swift's DPO commands.

2.x `swift dpo`: the fields of SftArguments and RLHFArguments. From an ms-swift git checkout:
    git show v2.6.1:swift/llm/utils/argument.py > /tmp/argument.py
    python tests/golden/swift_flags.py v2 /tmp/argument.py > tests/fixtures/ms_swift/dpo_flags_v2.6.1.txt

3.x `swift rlhf`: the fields of RLHFArguments and its ms-swift base classes, plus transformers'
Seq2SeqTrainingArguments (imported: run it in the golden virtualenv):
    mkdir /tmp/swift3 && git archive v3.12.6 swift/llm/argument swift/trainers | tar -x -C /tmp/swift3
    python tests/golden/swift_flags.py v3 /tmp/swift3/swift > tests/fixtures/ms_swift/rlhf_flags_v3.12.6.txt

tests/it/swift_flags.rs checks that lorafold implements, notes or refuses every one of them.
"""
import ast
import glob
import os
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


def classes_under(folder):
    """name -> (base names, field names) of every class in the .py files under folder."""
    out = {}
    for path in glob.glob(os.path.join(folder, "**", "*.py"), recursive=True):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
                names = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                out[node.name] = (bases, names)
    return out


def v3_flags(folder):
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    known = classes_under(folder)
    names, seen, todo = set(), set(), ["RLHFArguments"]
    while todo:
        c = todo.pop()
        if c in seen or c not in known:
            continue
        seen.add(c)
        bases, fields_ = known[c]
        names |= set(fields_)
        todo.extend(bases)
    names |= {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    return sorted(names)


if __name__ == "__main__":
    if sys.argv[1] == "v2":
        flags = fields(sys.argv[2], {"SftArguments", "RLHFArguments"})
    else:
        flags = v3_flags(sys.argv[2])
    for name in flags:
        print(name)
