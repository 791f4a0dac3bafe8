"""A loopback stand-in for the Hugging Face Hub, for tests that run huggingface_hub's real HTTP code.

``FakeHub`` serves, from memory, the part of the Hub HTTP API that timm-ferkd's pull and push
paths use (read from huggingface_hub 2.x):

==========================================================  ==========================================
GET  /api/{type}s/{repo}[/revision/{rev}]                   repo info (``sha`` = resolved commit)
GET  /api/{type}s/{repo}/tree/{rev}[/{path}]                file listing (one page; repos here have no folders)
HEAD/GET /[{type}s/]{repo}/resolve/{rev}/{path}             file, with X-Repo-Commit, ETag, Content-Length
                                                            (and Range requests for resumed downloads)
POST /api/repos/create                                      create a repo (409 when it exists)
POST /api/{type}s/{repo}/branch/{branch}                    create a branch (409 when it exists)
POST /api/{type}s/{repo}/preupload/{rev}                    upload mode: always "regular" (no LFS, no Xet)
POST /api/{type}s/{repo}/commit/{rev}                       NDJSON commit of base64 files and deletions
POST /api/validate-yaml                                     README metadata check (always fine)
==========================================================  ==========================================

Errors carry the ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound) that
huggingface_hub turns into its typed exceptions. Every request is logged in ``FakeHub.requests``.
"""
import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

__all__ = ['FakeHub', 'git_blob_sha1']

_GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (what the Hub reports as the ETag / oid of a regular file)."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    branches: Dict[str, str] = field(default_factory=dict)
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # commit -> full file snapshot
    messages: Dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        return None


class FakeHub:
    """In-memory Hub on ``http://127.0.0.1:<random port>``.

    Example:
        >>> hub = FakeHub()
        >>> endpoint = hub.start()
        >>> hub.create_repo('org/bank')
        >>> hub.commit('org/bank', {'manifest.json': b'{}'})
        >>> hub.stop()
    """

    def __init__(self):
        self.repos: Dict[Tuple[str, str], _Repo] = {}
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.RLock()
        self._counter = 0
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.endpoint = ''

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve in a background thread; returns the endpoint URL (for HF_ENDPOINT)."""
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05},
                                        name='fake-hub', daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- repository operations (also used directly by tests) ----------------------------------------

    def create_repo(self, repo_id: str, repo_type: str = 'dataset', private: bool = False) -> _Repo:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise FileExistsError(repo_id)
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            self.repos[key] = repo
            self._new_commit(repo, 'main', {'.gitattributes': _GITATTRIBUTES}, 'initial commit')
            return repo

    def repo(self, repo_id: str, repo_type: str = 'dataset') -> _Repo:
        return self.repos[(repo_type, repo_id)]

    def commit(self, repo_id: str, files: Dict[str, bytes], branch: str = 'main', deletes: Iterable[str] = (),
               message: str = 'commit', repo_type: str = 'dataset') -> str:
        """Add/replace ``files`` and delete ``deletes`` on ``branch``; returns the new commit hash."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            snapshot = dict(repo.commits[repo.branches[branch]])
            for path in deletes:
                snapshot.pop(path, None)
            snapshot.update(files)
            return self._new_commit(repo, branch, snapshot, message)

    def create_branch(self, repo_id: str, branch: str, start: str = 'main', repo_type: str = 'dataset') -> None:
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            if branch in repo.branches:
                raise FileExistsError(branch)
            repo.branches[branch] = repo.resolve(start)

    def files(self, repo_id: str, revision: str = 'main', repo_type: str = 'dataset') -> Dict[str, bytes]:
        """The files of a revision."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            return dict(repo.commits[repo.resolve(revision)])

    def _new_commit(self, repo: _Repo, branch: str, snapshot: Dict[str, bytes], message: str) -> str:
        self._counter += 1
        digest = hashlib.sha1(f'{repo.repo_id}\n{branch}\n{self._counter}\n'.encode())
        for path in sorted(snapshot):
            digest.update(f'{path}\0{git_blob_sha1(snapshot[path])}\n'.encode())
        sha = digest.hexdigest()
        repo.commits[sha] = snapshot
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    fake_hub: FakeHub = None

    def log_message(self, format, *args):  # keep test output clean
        pass

    # -- plumbing ---------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b';')[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(length) if length else b''

    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              content_type: str = 'application/json') -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD' and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: Optional[str], message: str, headers: Optional[Dict[str, str]] = None):
        headers = dict(headers or {})
        if code:
            headers['X-Error-Code'] = code
        headers['X-Error-Message'] = message
        self._json(status, {'error': message}, headers)

    def _segments(self) -> List[str]:
        path = urlsplit(self.path).path
        return [unquote(s) for s in path.split('/')[1:]]

    def _repo(self, repo_type: str, org: str, name: str) -> Optional[_Repo]:
        return self.fake_hub.repos.get((repo_type, f'{org}/{name}'))

    # -- dispatch ---------------------------------------------------------------------------------

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self):
        hub = self.fake_hub
        with hub.lock:
            hub.requests.append((self.command, urlsplit(self.path).path))
        seg = self._segments()
        body = self._body() if self.command == 'POST' else b''
        try:
            with hub.lock:
                self._route(seg, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, seg: List[str], body: bytes) -> None:
        method = self.command
        if method == 'POST' and seg[:3] == ['api', 'repos', 'create']:
            return self._create_repo(json.loads(body or b'{}'))
        if method == 'POST' and seg[:2] == ['api', 'validate-yaml']:
            return self._json(200, {'errors': [], 'warnings': []})
        if len(seg) >= 4 and seg[0] == 'api' and seg[1] in ('models', 'datasets', 'spaces'):
            repo_type = seg[1][:-1]
            repo = self._repo(repo_type, seg[2], seg[3])
            if repo is None:
                return self._error(404, 'RepoNotFound', 'Repository not found')
            rest = seg[4:]
            if method == 'GET' and not rest:
                return self._info(repo, 'main')
            if method == 'GET' and len(rest) == 2 and rest[0] == 'revision':
                return self._info(repo, rest[1])
            if method == 'GET' and len(rest) >= 2 and rest[0] == 'tree':
                return self._tree(repo, rest[1], '/'.join(rest[2:]))
            if method == 'POST' and len(rest) == 2 and rest[0] == 'preupload':
                return self._preupload(repo, rest[1], json.loads(body))
            if method == 'POST' and len(rest) == 2 and rest[0] == 'commit':
                return self._commit(repo, rest[1], body)
            if method == 'POST' and len(rest) == 2 and rest[0] == 'branch':
                return self._branch(repo, rest[1], json.loads(body or b'{}'))
            return self._error(404, None, f'no such endpoint {self.path}')
        if method in ('GET', 'HEAD'):
            repo_type = 'model'
            if seg and seg[0] in ('datasets', 'spaces'):
                repo_type, seg = seg[0][:-1], seg[1:]
            if len(seg) >= 5 and seg[2] == 'resolve':
                repo = self._repo(repo_type, seg[0], seg[1])
                if repo is None:
                    return self._error(404, 'RepoNotFound', 'Repository not found')
                return self._resolve(repo, seg[3], '/'.join(seg[4:]))
        return self._error(404, None, f'no such endpoint {self.path}')

    # -- endpoints --------------------------------------------------------------------------------

    def _info(self, repo: _Repo, revision: str) -> None:
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        files = repo.commits[commit]
        self._json(200, {
            'id': repo.repo_id, 'sha': commit, 'private': repo.private, 'tags': [],
            'siblings': [{'rfilename': p, 'size': len(d)} for p, d in sorted(files.items())],
        })

    def _tree(self, repo: _Repo, revision: str, folder: str) -> None:
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        prefix = folder.rstrip('/') + '/' if folder else ''
        self._json(200, [{'type': 'file', 'path': p, 'size': len(d), 'oid': git_blob_sha1(d)}
                         for p, d in sorted(repo.commits[commit].items()) if p.startswith(prefix)])

    def _resolve(self, repo: _Repo, revision: str, path: str) -> None:
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        data = repo.commits[commit].get(path)
        if data is None:
            return self._error(404, 'EntryNotFound', f'{path} does not exist', {'X-Repo-Commit': commit})
        headers = {'X-Repo-Commit': commit, 'ETag': f'"{git_blob_sha1(data)}"', 'Accept-Ranges': 'bytes'}
        status = 200
        range_header = self.headers.get('Range')
        if self.command == 'GET' and range_header and range_header.startswith('bytes='):
            start_s, _, end_s = range_header[len('bytes='):].partition('-')
            start = int(start_s)
            end = int(end_s) if end_s else len(data) - 1
            headers['Content-Range'] = f'bytes {start}-{end}/{len(data)}'
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type='application/octet-stream')

    def _create_repo(self, payload: dict) -> None:
        repo_type = payload.get('type') or 'model'
        repo_id = f'{payload.get("organization")}/{payload["name"]}' if payload.get('organization') \
            else payload['name']
        if '/' not in repo_id:
            repo_id = f'user/{repo_id}'
        prefix = '' if repo_type == 'model' else f'{repo_type}s/'
        url = f'{self.fake_hub.endpoint}/{prefix}{repo_id}'
        if (repo_type, repo_id) in self.fake_hub.repos:  # the Hub answers 409 with the repo's url
            message = 'You already created this repo'
            return self._json(409, {'error': message, 'url': url}, {'X-Error-Message': message})
        self.fake_hub.create_repo(repo_id, repo_type, private=payload.get('visibility') == 'private'
                                  or bool(payload.get('private')))
        self._json(200, {'url': url, 'name': repo_id})

    def _branch(self, repo: _Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            return self._error(409, None, f'Reference already exists: refs/heads/{branch}')
        start = repo.resolve(payload.get('startingPoint') or 'main')
        if start is None:
            return self._error(404, 'RevisionNotFound', 'Invalid starting point')
        repo.branches[branch] = start
        self._json(200, {})

    def _preupload(self, repo: _Repo, revision: str, payload: dict) -> None:
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        files = repo.commits[commit]
        self._json(200, {'files': [{
            'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False,
            'oid': git_blob_sha1(files[f['path']]) if f['path'] in files else None,
        } for f in payload['files']]})

    def _commit(self, repo: _Repo, revision: str, body: bytes) -> None:
        if revision not in repo.branches:
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision} (commit to a branch)')
        snapshot = dict(repo.commits[repo.branches[revision]])
        message = ''
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item['key'], item['value']
            if key == 'header':
                message = value.get('summary', '')
                parent = value.get('parentCommit')
                if parent and parent != repo.branches[revision]:
                    return self._error(412, None, 'A commit has happened since the parent commit')
            elif key == 'file':
                snapshot[value['path']] = base64.b64decode(value['content'])
            elif key == 'deletedFile':
                if value['path'] not in snapshot:
                    return self._error(404, 'EntryNotFound', "A file with this name doesn't exist")
                del snapshot[value['path']]
            elif key == 'deletedFolder':
                prefix = value['path'].rstrip('/') + '/'
                snapshot = {p: d for p, d in snapshot.items() if not p.startswith(prefix)}
            else:
                return self._error(400, None, f'unsupported commit operation {key!r} (this fake Hub has no LFS)')
        sha = self.fake_hub._new_commit(repo, revision, snapshot, message)
        prefix = '' if repo.repo_type == 'model' else f'{repo.repo_type}s/'
        self._json(200, {'success': True, 'commitOid': sha, 'pullRequestUrl': None,
                         'commitUrl': f'{self.fake_hub.endpoint}/{prefix}{repo.repo_id}/commit/{sha}'})
