"""The HTTP service under abuse: a maximal body does not stall other requests (a real server,
/readyz timed while it is parsed), malformed JSON and odd uploads are 400s, no URL is ever
fetched for a client, /predict_batch has /predict's batch rules, user values are echoed short,
/docs and the OpenAPI document are complete and every 4xx body matches its error schema, and
MODECONN_API_KEY guards every route but the health checks and the docs."""

from __future__ import annotations

import base64
import json
import logging
import socket
import statistics
import threading
import time
import warnings

import numpy as np
import pytest

from tests.bentoml_server import bentoml_server
from tests.error_bodies import ErrorBodies

MAX_BATCH = 64
KEY = "test-key-0123456789"
MB = 2**20


@pytest.fixture(scope="module")
def client(service_client, service_env):
    """The service in process (conftest: bodies up to 1 MB, batches up to 64), every 4xx body
    checked against its documented schema."""
    hooks = service_client.event_hooks
    bodies = ErrorBodies(service_client.get("/docs.json").json())
    bodies.install(service_client)
    service_client.error_bodies = bodies
    yield service_client
    service_client.event_hooks = hooks


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    """A real ``bentoml serve``: default body limit (64 MB), an API key."""
    env = {
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
        "MODECONN_ARTIFACTS": str(models_root),
        "MODECONN_MAX_BATCH": str(MAX_BATCH),
        "MODECONN_API_KEY": KEY,
        "MODECONN_MAX_BODY_MB": "64",  # explicitly: a module may have set 1 in os.environ
    }
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    with bentoml_server(env, log_file) as running:
        import httpx

        spec = httpx.get(f"{running['url']}/docs.json", timeout=30).json()
        running["bodies"] = ErrorBodies(spec)
        yield running


def _http(server, **kwargs):
    import httpx

    bodies: ErrorBodies = server["bodies"]
    return httpx.Client(base_url=server["url"], event_hooks={"response": [bodies.hook()]}, **kwargs)


def _x(n: int = 1, seed: int = 0) -> list:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).round(5).tolist()


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# 1. A maximal body is parsed off the event loop: /readyz answers meanwhile (a real server)


def _maximal_body(kind: str, size: int) -> tuple[bytes, dict[str, str]]:
    """A body of about ``size`` bytes: nested lists (batch, 1, 8, 8), base64, or an upload."""
    auth = {"authorization": f"Bearer {KEY}"}
    if kind == "nested lists":
        row = json.dumps(_x(1)[0])  # one (1, 8, 8) input, ~600 characters
        rows = ",".join([row] * (size // (len(row) + 1)))
        body = ('{"path": "paths/mlp", "inputs": [' + rows + "]}").encode()
        return body, {**auth, "content-type": "application/json"}
    if kind == "base64":
        floats = np.zeros(size * 3 // 16, dtype="<f4")  # 4 bytes each, 4/3 of it as base64
        text = base64.b64encode(floats.tobytes()).decode()
        body = json.dumps({"path": "paths/mlp", "inputs_b64": text, "shape": [1, len(floats)]})
        return body.encode(), {**auth, "content-type": "application/json"}
    boundary = "modeconn-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n'
        f"paths/mlp\r\n--{boundary}--\r\n".encode()
    )
    return body, {**auth, "content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    ("kind", "route", "status"),
    [
        ("nested lists", "/predict", 400),  # 100,000 inputs: above the batch limit
        ("base64", "/predict", 400),  # 11 million floats: not the path's input shape
        ("upload", "/predict_image", 400),  # 62 MB of noise: not an image
    ],
)
def test_readyz_answers_while_a_maximal_body_is_parsed(server, kind, route, status):
    body, headers = _maximal_body(kind, 62 * MB)
    assert 60 * MB < len(body) < 64 * MB
    answer: dict = {}

    def post() -> None:
        with _http(server, timeout=300) as http:
            start = time.perf_counter()
            got = http.post(route, content=body, headers=headers)
            answer.update(status=got.status_code, seconds=time.perf_counter() - start)

    thread = threading.Thread(target=post)
    latencies: list[float] = []
    with _http(server, timeout=60) as http:
        thread.start()
        time.sleep(0.3)  # the upload itself: loopback, a fraction of a second
        while thread.is_alive():
            start = time.perf_counter()
            assert http.get("/readyz").status_code == 200  # no key needed
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
        thread.join()
        assert http.get("/readyz").status_code == 200
    assert answer["status"] == status
    print(
        f"\n{kind}: {len(body) / MB:.0f} MB answered {answer['status']} in "
        f"{answer['seconds']:.2f} s; /readyz meanwhile: {len(latencies)} calls, median "
        f"{statistics.median(latencies) * 1000:.0f} ms, 90th percentile "
        f"{sorted(latencies)[int(0.9 * len(latencies))] * 1000:.0f} ms, max "
        f"{max(latencies) * 1000:.0f} ms"
    )
    assert len(latencies) >= 3, "the body was answered before /readyz could be timed"
    # The target is 100 ms; this machine is shared (2 cores), so the test allows 1 s.
    assert max(latencies) < 1.0, latencies


# ---------------------------------------------------------------------------------------------
# 2. Malformed JSON is a 400 with the documented body, on every JSON route

MALFORMED_JSON = [
    (b'{"path": "paths/mlp", "inputs": [[1, 2]', "Invalid JSON"),
    (b'[{"path": ', "Invalid JSON"),
    (b"nan]", "Invalid JSON"),
    (b'{"path": "paths/mlp"} extra', "Extra data"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"path": "\\ud800"}', "lone surrogate"),  # no UTF-8 answer could quote it
    (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    (b'{"path": "paths/mlp", "k": 1' + b"0" * 5000 + b"}", "too long"),
    (b"{" + b", ".join(b'"k%06d": 1' % i for i in range(8000)) + b"}", "more than 1000 members"),
]


@pytest.mark.parametrize("route", ["/predict", "/predict_batch", "/paths", "/export"])
@pytest.mark.parametrize(("body", "fragment"), MALFORMED_JSON)
def test_malformed_json_is_a_400_on_every_json_route(client, route, body, fragment):
    got = client.post(route, content=body, headers={"content-type": "application/json"})
    assert got.status_code == 400, got.text
    answer = got.json()
    assert fragment in answer["error"], answer
    assert answer["detail"][0]["type"] == "json_invalid"


def test_json_is_read_as_json_loads_reads_it():
    from service import decoder

    documents = [
        {"path": "paths/mlp", "inputs": _x(3), "k": 2, "raw": False, "t": None},
        [{"a": [1, 2.5, -3e-7, True, None, 'x\\y"z\u00e9\U0001f600']}] * 40,
        {"nested": [[[[[]]]], [{}], [[1], [2, [3]]], "tail"]},
        ["\\\\ud800 is text after an escaped backslash", "\t\n" * 50],
        [float("nan"), float("inf"), -float("inf"), 1e308, 0, -0.0],
    ]
    with pytest.MonkeyPatch.context() as mp:
        for step in (4, 7, 64, 1 << 16):  # tiny windows take every path of the decoder
            mp.setattr(decoder, "STEP", step)
            for doc in documents:
                for text in (json.dumps(doc), json.dumps(doc, indent=1, ensure_ascii=False)):
                    got = decoder.parse_json(text.encode())
                    assert json.dumps(got) == json.dumps(json.loads(text)), (step, text[:80])
    assert decoder.parse_json(b"") == {}  # an empty body, as BentoML reads it


def test_json_decoding_agrees_with_json_loads_on_random_documents():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from service import decoder

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(), st.text()
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(), inner, max_size=5),
        max_leaves=60,
    )

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(values, st.sampled_from([4, 9, 32]), st.integers(0, 2**32), st.booleans())
    def agree(value, step, seed, corrupt):
        text = json.dumps(value, ensure_ascii=bool(seed % 2))
        if corrupt and text:  # one character changed: both must accept, or both refuse
            i = seed % len(text)
            text = text[:i] + ']},"\\x 1'[seed % 8] + text[i + 1 :]
        try:
            expected = json.loads(text)
        except ValueError:
            expected = ValueError
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(decoder, "STEP", step)
            try:
                got = decoder.parse_json(text.encode("utf-8", "surrogatepass"))
            except decoder.JSONError as err:
                refusals = ("surrogate", "UTF-8")  # what json.loads accepts and we do not
                assert expected is ValueError or any(r in str(err) for r in refusals), err
                return
        assert expected is not ValueError, text
        assert json.dumps(got) == json.dumps(expected)

    agree()


# Documents whose commas, colons, brackets and whitespace fall on a window boundary at some STEP:
# trailing and doubled commas (arrays of scalars, strings and containers, objects), a key split
# from its colon, nested containers, delimiters inside strings, truncated documents.
TRICKY_JSON = [
    *("[-10,]", "[1,2,]", '["x",]', "[1,2 , ]", "[ 1 , 2 ,\n]", "[,]", "[,1]", "[1,,2]", "[1 2]"),
    *("[[1],[2],]", '[{"a":1},{"b":2},]', '[["a"],["b"],]', "[[],[],]", "[{},{},]", "[[[[]]],]"),
    *("[[1,2],[3,4],[5,6],[7,8],[9,10],]", "[[1,2],[3,4],[5,6],[7,8],[9,10]]", "[[[1,2],],[3]]"),
    *("[[1,2] ,[3,4], [5,6] , [7,8]]", "[[1],[2],1]", '[[1],[2],"x"]', "[[1][2]]", "[[1],,[2]]"),
    *('[{"a":[1]},{"a":[2]},{"a":[3]},]', '[{"a":[1]},{"a":[2]},{"a":[3]}]', '[{"a":1}{"b":2}]'),
    *('{"a":1,}', '{"a":1,"b":2,}', '{"a":1,"b":2}', '{"a" 1}', '{"a":}', '{"a"::1}', "{,}"),
    *('{"a":1 "b":2}', '{"a":1,"b"}', '{"a":1,,"b":2}', "{1:2}", '{"a":[1,2,],"b":3}'),
    *('{"a":{"b":[1,]}}', '{"abc":1,"de":[1,2,3,4,5,6,7,8,9,10,11,12],"f":{"g":"h",}}'),
    *("[1,[2,[3,]]]", "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]", "[1,2,3,4,5,6,7,8,9,0,-]"),
    *("[true,false,null,NaN,Infinity,-Infinity]", "[true,false,null,]", "[tru,false]", "[1.,2]"),
    *("[01]", "[-]", "[1e5,1E-5,-0.0,]", "[1e400]", "  [ 1 ,  2 ,  3 ]  ", "  [ 1 ,  2 ,  3 , ]  "),
    *('["a","b","c","d","e"]', '["a","b","c","d","e",]', '["a" "b"]', '["a",,"b"]'),
    *('["\\"",]', '["\\\\",]', '["a\\"b","c",]', '[",",","]', '[",]",1]', '["]",]'),
    *('{"a,":1,"]":2}', '{"}":1,}', '["\\ud83d\\ude00",]', '{"a":"\\u00e9\\n",}'),
    *("[[1],[2]", "[[1],[2]]]", '{"a":1}}', "[1]   x", "[1,2,3][", "1 2", "1,", " ", "-"),
    *("[", "]", "{", "}", '"abc', "[1", "[1,", '{"a"', '{"a":', '{"a":1', '{"a":1,', "[]", "{ }"),
]


def _spread(text: str) -> list[str]:
    """``text``, and with whitespace around each kind of delimiter (moves the boundaries)."""
    return [
        text,
        text.replace(",", " , "),
        text.replace(":", "\t:\n"),
        text.replace("[", "[ ").replace("{", "{\n"),
        text.replace("]", " ]").replace("}", "\r\n}"),
    ]


def test_json_decoding_agrees_with_json_loads_at_every_small_step():
    """Every window size from 1 to 40 over TRICKY_JSON: the same value as json.loads, or the
    same error at the same place. (A comma that ended a window once let "[1,2,]" through.)"""
    from service import decoder

    def loads(text: str) -> str:
        try:
            return json.dumps(json.loads(text))
        except json.JSONDecodeError as err:
            return f"{err.msg} at line {err.lineno} column {err.colno} (char {err.pos})"

    def parse(text: str) -> str:
        try:
            return json.dumps(decoder.parse_json(text.encode()))
        except decoder.JSONError as err:
            return str(err)

    texts = sorted({variant for text in TRICKY_JSON for variant in _spread(text)})
    expected = [loads(text) for text in texts]
    assert sum(e.startswith("Expecting value") for e in expected) > 100  # mostly invalid ones
    with pytest.MonkeyPatch.context() as mp:
        for step in range(1, 41):
            mp.setattr(decoder, "STEP", step)
            got = [parse(text) for text in texts]
            wrong = [(t, g, e) for t, g, e in zip(texts, got, expected, strict=True) if g != e]
            assert not wrong, (step, wrong[:5])


def test_release_empties_a_parsed_value_step_by_step():
    from service import decoder

    value = decoder.parse_json(json.dumps({"a": [[[1, 2]] * 3000, {"b": [[3]] * 10}]}).encode())
    inner = value["a"][0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decoder, "_FREE_STEP", 100)
        decoder.release(value)
    assert value == {} and inner == []


# ---------------------------------------------------------------------------------------------
# 3. An upload is a file part: never a URL to fetch or a path to open


@pytest.fixture
def listener():
    """A TCP port on 127.0.0.1 that records whether anyone connected."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_image_as_a_text_field_is_refused_and_never_fetched(client, listener):
    port = listener.getsockname()[1]
    for value in (
        "/etc/passwd",
        f"http://127.0.0.1:{port}/digit.png",
        f"https://127.0.0.1:{port}/digit.png",
        "file:///etc/passwd",
        "",
    ):
        fields = {"image": (None, value), "path": (None, "paths/mlp")}
        got = client.post("/predict_image", files=fields)
        assert got.status_code == 400, got.text
        assert "must be a file part" in got.json()["error"], got.text
        assert "root:" not in got.text  # nothing of /etc/passwd
    # The same, in a body BentoML would read as a URL to download (JSON): refused by type.
    url = f"http://127.0.0.1:{port}/digit.png".encode()
    got = client.post("/predict_image", content=url, headers={"content-type": "application/json"})
    assert got.status_code == 415
    time.sleep(0.2)
    assert not _connected(listener), "the service connected to a URL a client named"


def test_every_api_parses_its_own_body():
    """No input spec falls back to BentoML's parsing (which downloads URLs it finds)."""
    from service.bodies import parses_off_loop
    from service.service import ModeConnService

    assert ModeConnService.apis
    for name, api in ModeConnService.apis.items():
        assert parses_off_loop(api.input_spec), name


@pytest.mark.parametrize(
    "filename", ["a" * 300 + ".png", "../../../etc/passwd", "digit", "x.p\u00e9ng", ".png"]
)
def test_upload_file_names_are_never_used_as_given(client, filename):
    got = client.post(
        "/predict_image",
        files={"image": (filename, _png(), "image/png")},
        data={"path": "paths/mlp", "k": "2"},
    )
    assert got.status_code == 200, got.text


def test_text_fields_that_are_not_json_or_text_are_400(client):
    png = ("d.png", _png(), "image/png")
    cases = [
        ({"image": png, "path": ("p.txt", b"paths/mlp", "text/plain")}, "must be a text field"),
        ({"image": png, "path": (None, "paths/mlp"), "k": (None, "[" * 3000)}, "valid integer"),
    ]
    for files, fragment in cases:
        got = client.post("/predict_image", files=files)
        assert got.status_code == 400 and fragment in got.text, got.text


# ---------------------------------------------------------------------------------------------
# 4. /predict_batch: the batch rules of /predict, counted across the batch


def test_predict_batch_has_the_batch_rules_of_predict(client):
    def item(n: int, **extra) -> dict:
        return {"path": "paths/mlp", "inputs": _x(n), **extra}

    b64 = base64.b64encode(np.zeros((40, 64), dtype="<f4").tobytes()).decode()
    refused = [
        ([], "the batch is empty"),
        ([item(1)] * (MAX_BATCH + 1), f"above the maximum of {MAX_BATCH}"),
        ([item(40), item(40)], f"above the maximum of {MAX_BATCH}"),
        ([item(MAX_BATCH + 1)], f"above the maximum of {MAX_BATCH}"),
        ([{"path": "paths/mlp", "inputs_b64": b64, "shape": [40, 64]}] * 2, "above the maximum"),
        ([item(1, inputs=[])], "inputs is empty"),
    ]
    for batch, fragment in refused:
        got = client.post("/predict_batch", json=batch)
        assert got.status_code == 400 and fragment in got.json()["error"], got.text
    got = client.post("/predict_batch", json=[item(MAX_BATCH // 2), item(MAX_BATCH // 2)])
    assert got.status_code == 200 and [len(a["labels"]) for a in got.json()] == [32, 32]
    # /predict refuses the same way
    got = client.post("/predict", json=item(MAX_BATCH + 1))
    assert got.status_code == 400 and f"above the maximum of {MAX_BATCH}" in got.text


# ---------------------------------------------------------------------------------------------
# 5. User values are echoed short, in bodies and in logs


def test_clip_quotes_short_with_an_ellipsis():
    from service.errors import ECHO_LIMIT, clip

    assert clip("paths/mlp") == "'paths/mlp'"
    long = clip("x" * 10_000_000)
    assert len(long) == ECHO_LIMIT and long.endswith("…") and long.startswith("'xxx")
    assert clip("\ud800\x00") == "'\\ud800\\x00'"  # escaped: printable and UTF-8 safe
    assert clip("\ud800", quote=False) == "\\ud800"
    assert clip(10**5000).startswith("<an integer of 5001 digits")
    assert len(clip(list(range(100_000)))) == ECHO_LIMIT
    assert clip(12345) == "12345" and clip(None) == "None"


def _long_value_requests(client, value: str):
    digits = "9" * 4000
    png = ("d.png", _png(), "image/png")
    yield client.post("/predict", json={"path": value, "inputs": _x(1)})
    yield client.post("/predict", json={"path": "paths/mlp", "inputs": _x(1), value: 1})
    yield client.post(
        "/predict", json={"path": "paths/mlp", "inputs_b64": "AAAA", "shape": [1] * 50_000}
    )
    yield client.post(
        "/predict", content=b'{"path": "paths/mlp", "inputs": [[1]], "k": ' + digits.encode() + b"}"
    )
    yield client.post("/predict_batch", json=[{"path": value, "inputs": _x(1)}])
    yield client.post("/paths", json={"path": value})
    yield client.post("/export", json={"path": value})
    yield client.get("/paths", params={"path": value[:30_000]})
    yield client.get("/export", params={"path": value[:30_000]})
    yield client.get("/export", params={"path": "paths/mlp", "mode": value[:30_000]})
    yield client.get("/export", params={"path": "paths/mlp", "k": digits})
    yield client.get("/export", params={"path": "paths/mlp", "k": "x" + digits})
    yield client.post("/predict_image", files={"image": png, "path": (None, value)})
    yield client.post("/predict", content=b"{}", headers={"content-type": "text/" + value[:4000]})


def test_long_user_values_are_echoed_short_in_bodies_and_logs(client, caplog):
    value = "p" * (MB - 4096)  # the longest path a 1 MB body holds
    with caplog.at_level(logging.INFO):
        answers = list(_long_value_requests(client, value))
    for got in answers:
        assert 400 <= got.status_code < 500, got.text[:300]
        assert len(got.content) < 2000, (got.request.url.path, len(got.content))
    assert all("…" in got.json()["error"] for got in answers[:3])
    ours = [r for r in caplog.records if r.name.startswith(("modeconn", "bentoml"))]
    longest = max(len(r.getMessage()) for r in ours)
    assert longest < 1000, longest


def test_a_20_mb_path_gets_a_short_404(server):
    body = b'{"path": "' + b"p" * (20 * MB) + b'", "inputs": [[1]]}'
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with _http(server, timeout=120) as http:
        got = http.post("/predict", content=body, headers=headers)
    assert got.status_code == 404 and len(got.content) < 300, len(got.content)
    error = got.json()["error"]
    assert error.startswith("unknown path 'ppppp") and "…" in error
    assert max(len(line) for line in server["log"].read_text().splitlines()) < 1500


# ---------------------------------------------------------------------------------------------
# 6. The docs: /docs, the GET routes in the OpenAPI document, one error schema


def test_docs_serve_swagger_ui_from_the_server_itself(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("./static_content/") for a in assets), assets
    for asset in assets:  # shipped with BentoML, served here: no CDN, no analytics
        assert client.get(asset.lstrip(".")).status_code == 200, asset
    assert "googletagmanager" not in page.text
    initializer = client.get("/static_content/swagger-initializer.js").text
    assert '"./docs.json"' in initializer


def test_openapi_lists_get_routes_and_one_error_schema(client):
    spec = client.get("/docs.json").json()
    paths = spec["paths"]
    params = {p["name"]: p for p in paths["/export"]["get"]["parameters"]}
    assert params["path"]["required"] and not params["k"]["required"]
    assert params["mode"]["schema"]["enum"] == ["ensemble", "merged", "point", "cascade"]
    assert params["t"]["schema"]["maximum"] == 1.0
    assert [p["name"] for p in paths["/paths"]["get"]["parameters"]] == ["path"]
    assert "application/octet-stream" in paths["/export"]["get"]["responses"]["200"]["content"]
    assert "/readyz" in paths and "/predict_image" in paths
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    statuses = set()
    for route, item in paths.items():
        for method, operation in item.items():
            for status, response in operation.get("responses", {}).items():
                if 400 <= int(status) < 500:
                    statuses.add(int(status))
                    assert response["content"]["application/json"]["schema"] == error_ref, (
                        route,
                        method,
                        status,
                    )
    assert statuses == {400, 404, 413, 415}  # 401 only when a key is set
    assert "InvalidArgument" not in spec["components"]["schemas"]


def test_every_kind_of_4xx_matches_the_error_schema(client):
    bodies: ErrorBodies = client.error_bodies  # type: ignore[attr-defined]
    before = bodies.checked
    client.get("/nowhere")  # 404 from the router
    client.get("/predict")  # 405
    client.put("/paths", json={})  # 405 on a GET/POST route
    client.post(
        "/predict", content=b"x" * (MB + 1), headers={"content-type": "application/json"}
    )  # 413
    client.post("/predict", content=b"{}", headers={"content-type": "text/plain"})  # 415
    client.post("/predict", json={"path": "nope", "inputs": _x(1)})  # 404 from the catalog
    client.post("/predict", json={"path": "paths/mlp", "inputs": _x(1), "k": 7})  # 400, catalog
    client.post("/predict", json={"inputs": _x(1)})  # 400 from pydantic
    client.post("/predict_image", content=b"--x", headers={"content-type": "multipart/form-data"})
    assert bodies.checked - before == 9
    assert {400, 404, 405, 413, 415} <= bodies.statuses


# ---------------------------------------------------------------------------------------------
# 7. MODECONN_API_KEY (a real server)


def test_api_key_guards_every_route_but_health_and_docs(server):
    auth = {"authorization": f"Bearer {KEY}"}
    with _http(server, timeout=30) as http:
        for route in ("/livez", "/healthz", "/readyz", "/docs", "/docs.json", "/"):
            assert http.get(route).status_code == 200, route
        guarded = [
            ("GET", "/paths", {}),
            ("GET", "/export", {"params": {"path": "paths/mlp"}}),
            ("GET", "/metrics", {}),
            ("GET", "/schema.json", {}),
            ("POST", "/paths", {"json": {}}),
            ("POST", "/predict", {"json": {"path": "paths/mlp", "inputs": _x(1)}}),
            ("POST", "/predict_batch", {"json": [{"path": "paths/mlp", "inputs": _x(1)}]}),
            ("POST", "/export", {"json": {"path": "paths/mlp"}}),
            (
                "POST",
                "/predict_image",
                {"files": {"image": ("d.png", _png(), "image/png")}, "data": {"path": "paths/mlp"}},
            ),
            ("GET", "/nowhere", {}),
        ]
        for method, route, kwargs in guarded:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
                got = http.request(method, route, headers=headers, **kwargs)
                assert got.status_code == 401, (method, route, headers, got.text)
                assert got.headers["www-authenticate"].startswith("Bearer")
                assert KEY not in got.text
            got = http.request(method, route, headers=auth, **kwargs)
            assert got.status_code == (404 if route == "/nowhere" else 200), (route, got.text)
        spec = http.get("/docs.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
    assert "401" in spec["paths"]["/paths"]["get"]["responses"]
    assert "security" not in spec["paths"]["/readyz"]["get"]
    assert KEY not in server["log"].read_text()


def _raw(url: str, request: bytes) -> bytes:
    """``request`` sent as it is (bytes no HTTP client would send), the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_header_bytes_that_are_not_utf8_get_a_whole_answer(server):
    """BentoML's access log decoded a client's Content-Type as UTF-8: a traceback, and an answer
    cut after its headers, on any route."""
    body = json.dumps({"path": "paths/mlp", "inputs": _x(1)}).encode()
    for route, auth in (
        ("/readyz", b""),
        ("/predict", f"Authorization: Bearer {KEY}\r\n".encode()),
    ):
        method = b"POST" if route == "/predict" else b"GET"
        answer = _raw(
            server["url"],
            method
            + b" "
            + route.encode()
            + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + auth
            + b"Content-Type: application/json\xff\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body,
        )
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert len(rest) == length, answer
    time.sleep(0.5)  # the log line of the last answer
    assert "Traceback" not in server["log"].read_text()


def test_the_key_is_compared_in_constant_time():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import service.gate as gate

    app = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"))])
    compared: list[tuple[bytes, bytes]] = []
    original = gate.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gate.hmac, "compare_digest", spy)
        client = TestClient(gate.RequestGate(app, key="s3cret"))
        assert client.get("/x", headers={"authorization": "Bearer s3cret"}).text == "ok"
        assert client.get("/x", headers={"authorization": "bearer nope"}).status_code == 401
    assert compared == [(b"s3cret", b"s3cret"), (b"nope", b"s3cret")]
