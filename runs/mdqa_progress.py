# Prints which (model, setting) blocks of the running 03_mdqa notebook have finished generating.
import json, re, sys
nb = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "results/cpu/.03_mdqa.running.ipynb"))
s = ""
for c in nb["cells"]:
    for o in c.get("outputs", []):
        d = o.get("data", {}); t = o.get("text") or d.get("text/plain", "")
        s += ("".join(t) if isinstance(t, list) else t) + "\n"
done = re.findall(r"generate (\S+): 100%\|[^|]*\| (\d+)/\d+", s)
print(len(done), "blocks done:", [(m.split('/')[-2] if '/' in m else m, n) for m, n in done])
last = re.findall(r"generate [^\n\r]*", s)
print("last:", last[-1][-90:] if last else None)
