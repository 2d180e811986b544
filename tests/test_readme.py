"""The README's examples run as written: every file an example reads is supplied, by a heredoc in that example or an
earlier one, or by the repository (issue 31, case 28)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READS = re.compile(r"(?:--prompt-file|--context)\s+(\S+)|\$\(cat\s+(\S+?)\)")
WRITES = re.compile(r"cat\s+>\s*(\S+)\s+<<\s*'?(\w+)'?")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_every_file_an_example_reads_is_supplied():
    written: set[str] = set()
    missing = []
    for block in bash_blocks((ROOT / "README.md").read_text()):
        body = block
        for name, end in WRITES.findall(block):  # the heredoc's lines are data, not commands
            written.add(name)
            body = re.sub(rf"<<\s*'?{end}'?\n.*?\n{end}\n", "\n", body, count=1, flags=re.S)
        for match in READS.finditer(body):
            name = match.group(1) or match.group(2)
            if name == "-" or name.isdigit() or name in written or (ROOT / name).exists():
                continue
            missing.append(name)
    assert missing == [], f"README examples read files nothing supplies: {missing}"


def test_the_check_sees_a_missing_file():
    block = "pkv-export generate --prompt-file essay.txt\npkv-export client --prompt \"$(cat report.txt)\"\n"
    assert [m.group(1) or m.group(2) for m in READS.finditer(block)] == ["essay.txt", "report.txt"]
    assert bash_blocks("```bash\ncat > a.txt <<'EOF'\nx\nEOF\n```\n") == ["cat > a.txt <<'EOF'\nx\nEOF\n"]
