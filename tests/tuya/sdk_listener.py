"""Run Tuya's own Python SDK (tuya-iot-py-sdk, unchanged) against meterhub; print each message as JSON.

Usage: python sdk_listener.py ENDPOINT ACCESS_ID SECRET USERNAME PASSWORD custom|smart_home SECONDS
Runs in its own virtualenv (the SDK needs paho-mqtt < 2). Prints one JSON line per decrypted message,
after a first line {"login": ...}.
"""

import json
import sys
import time

from tuya_iot import AuthType, TuyaOpenAPI, TuyaOpenMQ

endpoint, access_id, secret, username, password, auth, seconds = sys.argv[1:8]
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
mq.add_message_listener(lambda msg: print(json.dumps(msg), flush=True))
mq.start()
time.sleep(float(seconds))
mq.stop()
