"""A small in-memory stand-in for the Hugging Face Hub HTTP API, for round-trip tests.

It speaks the subset of the protocol that huggingface_hub 2.4 / transformers 5.24 use for
`create_repo`, `create_commit`/`upload_file`/`push_to_hub` (preupload + NDJSON commit with every file
inlined as base64: preupload always answers `uploadMode: regular`, so neither LFS nor Xet is involved),
`model_info`, `list_repo_tree`, `get_paths_info`, `whoami` and `hf_hub_download` (HEAD/GET resolve).
Anything else is answered 501 and recorded in `HubServer.errors`, which the `hub` fixture asserts empty.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "user"
TOKEN = "hf_dummy_test_token"
DATE = "2024-01-01T00:00:00.000Z"


def git_oid(data: bytes) -> str:
    """Git blob id, as the Hub reports (and huggingface_hub computes) for regular, non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.headers, self.extra = status, code, headers or {}, extra


@dataclass
class Repo:
    commits: dict[str, tuple[dict[str, bytes], str]] = field(default_factory=dict)  # sha -> (files, title)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes], title: str) -> str:
        parent = self.branches.get(branch, "")
        blob = json.dumps([parent, title, sorted((p, git_oid(d)) for p, d in files.items())]).encode()
        sha = hashlib.sha1(blob).hexdigest()
        self.commits[sha], self.branches[branch] = (dict(files), title), sha
        return sha

    def resolve(self, rev: str) -> str:
        sha = self.branches.get(rev, rev)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha


_REPO = r"/(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (methods, path regex on the still-quoted path, handler name)
    ({"POST"}, r"/api/repos/create", "create_repo"),
    ({"POST"}, r"/api/validate-yaml", "validate_yaml"),
    ({"GET"}, r"/api/whoami-v2", "whoami"),
    ({"GET"}, rf"/api/models{_REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ({"GET"}, rf"/api/models{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ({"POST"}, rf"/api/models{_REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ({"POST"}, rf"/api/models{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ({"POST"}, rf"/api/models{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ({"GET", "HEAD"}, rf"{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
WRITES = {"create_repo", "preupload", "commit"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response carries Content-Length
    timeout = 60  # per-connection socket timeout: a stuck client cannot pin a server thread forever
    server: "_Server"

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format, *args):  # route access logs into HubServer.log instead of stderr
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self):
        hub, url = self.server.hub, urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._body() if self.command in {"POST", "PUT", "PATCH"} else b""
        try:
            for methods, pattern, name in ROUTES:
                if self.command in methods and (m := re.fullmatch(pattern, url.path)):
                    if name in WRITES and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        raise HubError(401, None, "Invalid credentials in Authorization header")
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    with hub.lock:
                        status, body, headers = getattr(hub, name)(self, **args)
                    break
            else:
                hub.fail(f"unknown request: {self.command} {self.path}")
                raise HubError(501, None, f"hub_server.py does not implement {self.command} {url.path}")
        except HubError as e:
            status, body, headers = e.status, {"error": str(e), **e.extra}, {"X-Error-Message": str(e), **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
        except Exception as e:  # a bug in the fake hub must fail the test, not look like a Hub answer
            hub.fail(f"server error on {self.command} {self.path}: {e!r}")
            status, body, headers = 500, {"error": repr(e)}, {}
        hub.log.append((self.command, self.path, status))
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"


class HubServer:
    """`with HubServer() as hub:` serves on `hub.url` from a daemon thread until exit (or `max_lifetime` s)."""

    def __init__(self, max_lifetime: float = 600):
        self.repos: dict[str, Repo] = {}
        self.errors: list[str] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._timer = threading.Timer(max_lifetime, self._expire)
        self._timer.daemon = True

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client subprocess (huggingface_hub reads HF_ENDPOINT at import time)."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def __enter__(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def _expire(self) -> None:
        self.fail("hub server reached its max lifetime and stopped itself")
        self._httpd.shutdown()

    def fail(self, message: str) -> None:
        print(f"[hub_server] ERROR: {message}", file=sys.stderr, flush=True)
        self.errors.append(message)

    def assert_clean(self) -> None:
        assert not self.errors, "fake Hub saw unexpected requests/errors:\n" + "\n".join(self.errors)

    # ---- helpers -------------------------------------------------------------------------------
    def _repo(self, repo: str) -> Repo:
        if repo not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo}")
        return self.repos[repo]

    def _snapshot(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]]:
        r = self._repo(repo)
        sha = r.resolve(rev)
        return sha, r.commits[sha][0]

    def _branch(self, repo: str, rev: str, req) -> Repo:
        r = self._repo(repo)
        if req.query.get("create_pr") or rev not in r.branches:  # PRs / commits on shas: not implemented
            self.fail(f"unsupported write target {rev!r} (query {req.query})")
            raise HubError(404, "RevisionNotFound", f"Invalid branch: {rev}")
        return r

    @staticmethod
    def _entry(path: str, data: bytes | None, sha: str, title: str, expand: bool) -> dict:
        if data is None:
            entry = {"type": "directory", "oid": hashlib.sha1(f"{sha}:{path}".encode()).hexdigest(), "size": 0}
        else:
            entry = {"type": "file", "oid": git_oid(data), "size": len(data)}
        entry["path"] = path
        if expand:
            entry["lastCommit"] = {"id": sha, "title": title, "date": DATE}
        return entry

    # ---- endpoints: each returns (status, body, headers) ----------------------------------------
    def create_repo(self, req):
        payload = json.loads(req.body)
        if payload.get("type", "model") != "model":
            self.fail(f"only model repos are implemented, got {payload}")
            raise HubError(400, None, "only model repos are implemented")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            # huggingface_hub's create_repo(exist_ok=True) reads "url" from this 409 body, as the real Hub sends it
            raise HubError(409, None, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = Repo()
        self.repos[repo_id].commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                   "initial commit")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def validate_yaml(self, req):
        content = json.loads(req.body)["content"]
        m = re.match(r"---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
            assert isinstance(meta, dict) or meta is None, f"metadata must be a mapping, got {type(meta).__name__}"
        except Exception as e:
            return 400, {"errors": [{"message": f"invalid YAML metadata: {e}"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def whoami(self, req):
        if req.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return 200, {"type": "user", "id": "0" * 24, "name": USER, "fullname": USER, "orgs": [],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}, {}

    def model_info(self, req, repo, rev="main"):
        sha, files = self._snapshot(repo, rev)
        siblings = [{"rfilename": p, "blobId": git_oid(d), "size": len(d)} for p, d in sorted(files.items())]
        return 200, {"_id": sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                     "lastModified": DATE, "createdAt": DATE, "private": False, "disabled": False, "gated": False,
                     "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "spaces": []}, {}

    def tree(self, req, repo, rev, path=""):
        sha, files = self._snapshot(repo, rev)
        title, prefix = self._repo(repo).commits[sha][1], path.strip("/") + "/" if path.strip("/") else ""
        recursive, expand = (req.query.get(k, "").lower() in {"1", "true"} for k in ("recursive", "expand"))
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
        entries: dict[str, bytes | None] = {}  # path -> content, None for a directory
        for p, data in files.items():
            parts = p[len(prefix):].split("/") if p.startswith(prefix) else []
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                entries.setdefault(prefix + "/".join(parts[:i]), None)
            if parts and (recursive or len(parts) == 1):
                entries[p] = data
        return 200, [self._entry(p, d, sha, title, expand) for p, d in sorted(entries.items())], {}

    def paths_info(self, req, repo, rev):
        sha, files = self._snapshot(repo, rev)
        form = parse_qs(req.body.decode())
        expand, title = form.get("expand", [""])[-1].lower() == "true", self._repo(repo).commits[sha][1]
        out = [self._entry(p, files[p], sha, title, expand) for p in form.get("paths", []) if p in files]
        out += [self._entry(p, None, sha, title, expand) for p in form.get("paths", [])
                if p not in files and any(f.startswith(p.rstrip("/") + "/") for f in files)]
        return 200, out, {}

    def preupload(self, req, repo, rev):
        files = self._branch(repo, rev, req).commits[self.repos[repo].branches[rev]][0]
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_oid(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(req.body)["files"]]
        return 200, {"files": answer, "commitOid": self.repos[repo].branches[rev]}, {}

    def commit(self, req, repo, rev):
        r = self._branch(repo, rev, req)
        if req.headers.get("Content-Type") != "application/x-ndjson":
            self.fail(f"commit with Content-Type {req.headers.get('Content-Type')!r}")
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "commit payload must start with a header line")
        header, files = lines[0]["value"], dict(r.commits[r.branches[rev]][0])
        if header.get("parentCommit") not in (None, r.branches[rev]):
            raise HubError(412, None, f"parentCommit {header['parentCommit']} is not the head of {rev}")
        for op in lines[1:]:
            key, value = op["key"], op["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile" and value["path"] in files:
                del files[value["path"]]
            elif key == "deletedFile":
                raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile included: preupload never answers "lfs", so an LFS pointer here is a client surprise
                self.fail(f"unsupported commit operation {key}: {json.dumps(value)[:200]}")
                raise HubError(400, None, f"unsupported commit operation {key}")
        sha = r.commit(rev, files, header.get("summary", ""))
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo}/commit/{sha}",
                     "hookOutput": "", "pullRequestUrl": None}, {}

    def resolve(self, req, repo, rev, path):
        sha, files = self._snapshot(repo, rev)
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
        data, status = files[path], 200
        headers = {"ETag": f'"{git_oid(data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        if m := re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", "")):
            start, end = int(m.group(1)), int(m.group(2) or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start:end + 1], 206
            headers["Content-Length"] = str(len(data))
        return status, data, headers
