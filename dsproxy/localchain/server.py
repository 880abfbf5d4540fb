"""The local chain's Solana JSON-RPC over HTTP: a plain ASGI app served by uvicorn.

It answers the methods solana-py's AsyncClient (and the Solana CLI's common reads) use, in the
shapes a real node returns, so the same client code runs against it and against a cluster.
`LocalChainServer` runs it in a thread on 127.0.0.1 (tests: `async with`), or in the
foreground for `dsproxy localchain`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import base58
import uvicorn
from solders.hash import Hash
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature

from dsproxy.localchain.chain import LAMPORTS_PER_SIGNATURE, LocalChain, RpcFailure

__all__ = ["LocalChainServer", "make_app"]

log = logging.getLogger(__name__)

VERSION = {"solana-core": "2.1.0", "feature-set": 0}
_U64_MAX = 2**64 - 1
_BODY_BYTES_MAX = 1 << 20
_SIGNATURES_PER_REQUEST_MAX = 256
Handler = Callable[[LocalChain, list[Any]], Any]


def _params_at(params: list[Any], index: int, default: Any = None) -> Any:
    return params[index] if len(params) > index and params[index] is not None else default


def _pubkey(value: Any) -> Pubkey:
    try:
        return Pubkey.from_string(str(value))
    except ValueError:
        raise RpcFailure(-32602, f"Invalid param: Invalid pubkey {value!r}") from None


def _decode_transaction(params: list[Any]) -> bytes:
    encoded = _params_at(params, 0)
    encoding = _params_at(params, 1, {}).get("encoding", "base58")
    if not isinstance(encoded, str):
        raise RpcFailure(-32602, "Invalid params: the transaction must be a string")
    try:
        return (
            base64.b64decode(encoded, validate=True)
            if encoding == "base64"
            else (base58.b58decode(encoded))
        )
    except ValueError:
        raise RpcFailure(-32602, f"invalid transaction: not {encoding}") from None


def _context(chain: LocalChain, value: Any) -> dict[str, Any]:
    return {"context": {"apiVersion": VERSION["solana-core"], "slot": chain.slot}, "value": value}


def _account_json(chain: LocalChain, pubkey: Pubkey) -> dict[str, Any] | None:
    account = chain.get_account(pubkey)
    if account is None:
        return None
    return {
        "lamports": account.lamports,
        "owner": str(account.owner),
        "data": [base64.b64encode(bytes(account.data)).decode(), "base64"],
        "executable": account.executable,
        "rentEpoch": _U64_MAX,
        "space": len(account.data),
    }


def _get_account_info(chain: LocalChain, params: list[Any]) -> Any:
    return _context(chain, _account_json(chain, _pubkey(_params_at(params, 0))))


def _get_multiple_accounts(chain: LocalChain, params: list[Any]) -> Any:
    keys = _params_at(params, 0, [])
    return _context(chain, [_account_json(chain, _pubkey(key)) for key in keys[:100]])


def _get_balance(chain: LocalChain, params: list[Any]) -> Any:
    return _context(chain, chain.get_balance(_pubkey(_params_at(params, 0))))


def _get_latest_blockhash(chain: LocalChain, _params: list[Any]) -> Any:
    blockhash, last_valid = chain.latest_blockhash()
    return _context(chain, {"blockhash": str(blockhash), "lastValidBlockHeight": last_valid})


def _is_blockhash_valid(chain: LocalChain, params: list[Any]) -> Any:
    try:
        blockhash = Hash.from_string(str(_params_at(params, 0)))
    except ValueError:
        raise RpcFailure(-32602, "Invalid param: not a blockhash") from None
    return _context(chain, chain.is_blockhash_valid(blockhash))


def _get_fee_for_message(chain: LocalChain, params: list[Any]) -> Any:
    try:
        message = Message.from_bytes(base64.b64decode(str(_params_at(params, 0))))
    except ValueError:
        raise RpcFailure(-32602, "Invalid param: not a base64 message") from None
    fee = LAMPORTS_PER_SIGNATURE * message.header.num_required_signatures
    known = chain.is_blockhash_valid(message.recent_blockhash)
    return _context(chain, fee if known else None)


def _send_transaction(chain: LocalChain, params: list[Any]) -> Any:
    config = _params_at(params, 1, {})
    signature = chain.send_transaction(
        _decode_transaction(params), skip_preflight=bool(config.get("skipPreflight", False))
    )
    return str(signature)


def _simulate_transaction(chain: LocalChain, params: list[Any]) -> Any:
    config = _params_at(params, 1, {})
    simulation = chain.simulate_transaction(
        _decode_transaction(params), sig_verify=bool(config.get("sigVerify", False))
    )
    return _context(
        chain,
        {
            "err": simulation.error,
            "logs": list(simulation.logs),
            "accounts": None,
            "unitsConsumed": simulation.units_consumed,
            "returnData": None,
            "innerInstructions": None,
            "replacementBlockhash": None,
        },
    )


def _get_signature_statuses(chain: LocalChain, params: list[Any]) -> Any:
    signatures = _params_at(params, 0, [])
    if len(signatures) > _SIGNATURES_PER_REQUEST_MAX:
        raise RpcFailure(-32602, f"Too many inputs provided; max {_SIGNATURES_PER_REQUEST_MAX}")
    try:
        parsed = [Signature.from_string(str(text)) for text in signatures]
    except ValueError:
        raise RpcFailure(-32602, "Invalid param: not a signature") from None
    return _context(chain, [chain.signature_status(signature) for signature in parsed])


def _request_airdrop(chain: LocalChain, params: list[Any]) -> Any:
    lamports = _params_at(params, 1)
    if type(lamports) is not int or lamports <= 0:
        raise RpcFailure(-32602, "Invalid param: lamports must be a positive integer")
    return str(chain.airdrop(_pubkey(_params_at(params, 0)), lamports))


def _get_minimum_balance(chain: LocalChain, params: list[Any]) -> Any:
    data_len = _params_at(params, 0, 0)
    if type(data_len) is not int or data_len < 0:
        raise RpcFailure(-32602, "Invalid param: data length must be a non-negative integer")
    return chain.minimum_balance(data_len)


_METHODS: dict[str, Handler] = {
    "getHealth": lambda chain, params: "ok",
    "getVersion": lambda chain, params: VERSION,
    "getSlot": lambda chain, params: chain.slot,
    "getBlockHeight": lambda chain, params: chain.slot,
    "getGenesisHash": lambda chain, params: str(Hash.default()),
    "getAccountInfo": _get_account_info,
    "getMultipleAccounts": _get_multiple_accounts,
    "getBalance": _get_balance,
    "getLatestBlockhash": _get_latest_blockhash,
    "isBlockhashValid": _is_blockhash_valid,
    "getFeeForMessage": _get_fee_for_message,
    "getMinimumBalanceForRentExemption": _get_minimum_balance,
    "sendTransaction": _send_transaction,
    "simulateTransaction": _simulate_transaction,
    "getSignatureStatuses": _get_signature_statuses,
    "requestAirdrop": _request_airdrop,
}


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def handle_request(chain: LocalChain, request: Any) -> dict[str, Any]:
    """Answer one JSON-RPC request object."""
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        return _error(None, -32600, "Invalid request")
    request_id, method = request.get("id"), request["method"]
    params = request.get("params") or []
    handler = _METHODS.get(method)
    if handler is None:
        return _error(request_id, -32601, "Method not found")
    if not isinstance(params, list):
        return _error(request_id, -32602, "Invalid params: expected an array")
    try:
        result = handler(chain, params)
    except RpcFailure as failure:
        return _error(request_id, failure.code, failure.message, failure.data)
    except (AttributeError, OverflowError, TypeError, ValueError) as exc:
        return _error(request_id, -32602, f"Invalid params: {exc}")
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def make_app(chain: LocalChain) -> Callable[..., Awaitable[None]]:
    """An ASGI app: POST a JSON-RPC request (or a batch) to any path."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > _BODY_BYTES_MAX:
                await _respond(send, 413, {"error": "request body too large"})
                return
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            await _respond(send, 405, {"error": "POST JSON-RPC requests"})
            return
        try:
            request = json.loads(body)
        except ValueError:
            await _respond(send, 200, _error(None, -32700, "Parse error"))
            return
        if isinstance(request, list):
            await _respond(send, 200, [handle_request(chain, item) for item in request])
        else:
            await _respond(send, 200, handle_request(chain, request))

    return app


async def _respond(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LocalChainServer:
    """Serve a LocalChain on 127.0.0.1; `async with` runs it in a thread (port 0 = any free)."""

    def __init__(
        self,
        chain: LocalChain,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        slot_interval_s: float | None = None,
    ) -> None:
        self.chain = chain
        self.host = host
        self.port = port
        self.slot_interval_s = slot_interval_s
        config = uvicorn.Config(
            make_app(chain), log_level="warning", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bind(self, sock: socket.socket | None = None) -> socket.socket:
        """Bind the listening socket now (so that `url` names the real port), or take `sock`,
        bound already (the command binds it itself, to say clearly why a port cannot be had)."""
        if self._socket is not None:
            return self._socket
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        # Answers go out as two writes (head, body): without NODELAY each waits a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = sock.getsockname()[1]
        self._socket = sock
        return sock

    async def _tick(self) -> None:
        assert self.slot_interval_s is not None
        while True:
            await asyncio.sleep(self.slot_interval_s)
            self.chain.advance_slots(1)

    async def serve(self) -> None:
        """Serve until `stop()` (or a signal, in the foreground)."""
        sock = self.bind()
        ticker = asyncio.create_task(self._tick()) if self.slot_interval_s else None
        try:
            await self._server.serve(sockets=[sock])
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker

    def stop(self) -> None:
        self._server.should_exit = True

    def start(self) -> None:
        """Serve from a background thread; return once the server accepts connections."""
        self.bind()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve()), name="localchain", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the local chain server failed to start")
            time.sleep(0.005)

    def close(self) -> None:
        """Stop the background server and release its port."""
        self.stop()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._socket is not None:
            self._socket.close()

    async def __aenter__(self) -> LocalChainServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await asyncio.to_thread(self.close)
