#!/usr/bin/env python3
"""Tools/doc-coverage.py — public declarations without a `///` summary.

Reads the symbol graphs `swift package dump-symbol-graph` writes (public and open only)
and lists every declaration in Sources/ that has no doc comment, module by module.
Exit status 1 when any is missing (CI), 0 otherwise. `--summary` prints counts only.
"""
import json, os, subprocess, sys, glob

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(root)
out = subprocess.run(["swift", "package", "dump-symbol-graph", "--minimum-access-level", "public"],
                     capture_output=True, text=True)
if out.returncode != 0:
    sys.stderr.write(out.stdout + out.stderr)
    sys.exit(2)
folder = [l.split("Files written to ", 1)[1].strip() for l in out.stdout.splitlines() if "Files written to" in l][0]
missing, total = {}, {}
seen = set()
graphs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, "*.symbols.json")))]
documented = {s["identifier"]["precise"] for g in graphs for s in g.get("symbols", []) if s.get("docComment")}
# A member that implements a protocol requirement shows the requirement's documentation
# (DocC's inherited docs): it counts as documented when the requirement is, or when the
# protocol is another package's (Codable, CustomStringConvertible, Error...).
ours = {s["identifier"]["precise"] for g in graphs for s in g.get("symbols", [])}
inherits = set()
for g in graphs:
    for r in g.get("relationships", []):
        origin = r.get("sourceOrigin", {}).get("identifier")
        if origin and (origin in documented or origin not in ours):
            inherits.add(r["source"])
for graph in graphs:
    for s in graph.get("symbols", []):
        loc = s.get("location", {}).get("uri", "")
        if "/Sources/" not in loc or s.get("accessLevel") not in ("public", "open"):
            continue
        key = s["identifier"]["precise"]
        if key in seen:
            continue
        seen.add(key)
        module = loc.split("/Sources/", 1)[1].split("/", 1)[0]
        total[module] = total.get(module, 0) + 1
        if not s.get("docComment") and key not in inherits:
            line = s["location"]["position"]["line"] + 1
            name = ".".join(s.get("pathComponents", [s["names"]["title"]]))
            missing.setdefault(module, []).append(f"{loc.split('/Sources/', 1)[1]}:{line}: {name}")
bad = sum(len(v) for v in missing.values())
for module in sorted(total):
    print(f"{module}: {total[module] - len(missing.get(module, []))}/{total[module]} documented")
    if "--summary" not in sys.argv:
        for m in missing.get(module, []):
            print("  " + m)
print(f"all: {sum(total.values()) - bad}/{sum(total.values())} public declarations have a /// summary")
sys.exit(1 if bad else 0)
