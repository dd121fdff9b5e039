"""Drive Tuya's own Python SDK (tuya-iot-py-sdk 0.6.6, unchanged) against meterhub's device API.

Usage: python sdk_devices.py ENDPOINT ACCESS_ID SECRET USERNAME PASSWORD custom|smart_home
Runs in its own virtualenv (the SDK needs paho-mqtt < 2). Logs in, starts TuyaOpenMQ, builds a
TuyaDeviceManager and a TuyaHomeManager, prints {"login": ...}, then reads one JSON request per line
on stdin and prints one JSON answer per line:

- {"op": "update_cache"}: TuyaHomeManager.update_device_cache(), answers the device map;
- {"op": "devices"}: the device map as it is now (status follows the MQ events);
- {"op": "wait_status", "id", "code", "value", "timeout"}: until device_map[id].status[code] == value;
- {"op": "manager", "method", "args"}: a TuyaDeviceManager method's raw answer (or the exception);
- {"op": "home", "method"}: a TuyaHomeManager method (query_scenes, query_infrared_devices);
- {"op": "asset", "method", "args"}: a TuyaAssetManager method;
- {"op": "get", "path", "params"}: TuyaOpenAPI.get;
- {"op": "quit"}.
"""

import json
import sys
import time

from tuya_iot import AuthType, TuyaAssetManager, TuyaDeviceManager, TuyaHomeManager, TuyaOpenAPI, TuyaOpenMQ

endpoint, access_id, secret, username, password, auth = sys.argv[1:7]
auth_type = AuthType.CUSTOM if auth == "custom" else AuthType.SMART_HOME
api = TuyaOpenAPI(endpoint, access_id, secret, auth_type)
if auth_type == AuthType.CUSTOM:
    response = api.connect(username, password)
else:
    response = api.connect(username, password, "49", "meterhub")
print(json.dumps({"login": response}), flush=True)
if not response.get("success"):
    sys.exit(2)
mq = TuyaOpenMQ(api)
mq.start()
devices = TuyaDeviceManager(api, mq)
homes = TuyaHomeManager(api, mq, devices)
assets = TuyaAssetManager(api)


def plain(obj):
    return {k: v for k, v in vars(obj).items()}


def device_map():
    return {
        dev_id: {
            **{k: v for k, v in vars(d).items() if k not in ("status", "function", "status_range")},
            "status": dict(d.status),
            "function": {code: plain(f) for code, f in d.function.items()},
            "status_range": {code: plain(s) for code, s in d.status_range.items()},
        }
        for dev_id, d in devices.device_map.items()
    }


def handle(req):
    op = req["op"]
    if op == "update_cache":
        homes.update_device_cache()
        return {"devices": device_map()}
    if op == "devices":
        return {"devices": device_map()}
    if op == "wait_status":
        deadline = time.monotonic() + req.get("timeout", 10)
        while time.monotonic() < deadline:
            dev = devices.device_map.get(req["id"])
            if dev is not None and dev.status.get(req["code"]) == req["value"]:
                return {"ok": True, "status": dict(dev.status)}
            time.sleep(0.05)
        dev = devices.device_map.get(req["id"])
        return {"ok": False, "status": dict(dev.status) if dev else None}
    if op == "manager":
        return {"result": getattr(devices, req["method"])(*req.get("args", []))}
    if op == "home":
        found = getattr(homes, req["method"])()
        return {"result": [plain(x) for x in found]}
    if op == "asset":
        return {"result": getattr(assets, req["method"])(*req.get("args", []))}
    if op == "get":
        return {"result": api.get(req["path"], req.get("params"))}
    raise ValueError(f"unknown op {op!r}")


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "quit":
        break
    try:
        answer = handle(req)
    except Exception as exc:  # the SDK crashing is an answer too
        answer = {"exception": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer, default=str), flush=True)
mq.stop()
