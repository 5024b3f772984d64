#!/usr/bin/env python3
"""Writes the seed corpora of fuzz/corpus/<target>/ from the project's own examples: the
request in docs/contract.md and the unit tests, the callback bodies of the wechat.rs tests and
docs/callbacks.md, and the official crypto vectors (tests/vectors/crypto.json).

Run from the repository root: python3 fuzz/seeds.py. Seeds are named seed-*; inputs kept from
fuzzing runs (crash-* regressions, cmin'd coverage) are left alone."""
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- request_json ---------------------------------------------------------------------------
FULL = {
    "id": "0193a9c2-7a4e-7cc0-9c1e-2f4d7c0b1a11",
    "template": {"id": "order_shipped", "version": 0, "locale": "zh_CN"},
    "variables": {"order_id": "A-1001", "carrier": "SF Express", "eta": "tomorrow"},
    "recipients": [{"wechatOpenid": "oDemoUser000000000000000001x"}],
    "channels": ["wechat.template"],
    "priority": "PRIORITY_HIGH",
    "sendAt": "2026-11-23T10:00:00Z",
    "expiresAt": "2026-11-24T10:00:00Z",
    "idempotencyKey": "order-A-1001-shipped",
    "metadata": {"order_id": "A-1001", "source": "shop"},
}
REQUESTS = {
    "full": json.dumps(FULL, indent=2),
    "minimal": '{"template":{"id":"t"},"recipients":[{"wechatOpenid":"o"}]}',
    "snake_case": '{"template":{"id":"t","version":3},"recipients":[{"wechat_openid":"x","user_id":"u"}],'
    '"idempotency_key":"k","send_at":"2026-11-23T10:00:00.123456789+08:00"}',
    "variables": '{"template":{"id":"order_shipped","locale":"zh-CN"},"variables":{"order_id":"A-1","items":3,'
    '"price":12.5,"gift":true,"note":null,"lines":[{"sku":"S1","qty":1e2},[-0.0,1.7976931348623157e308]],'
    '"nested":{"a":{"b":"\\u4e2d\\u6587"}}},"recipients":[{"email":"a@b"}],"priority":2}',
    "all_addresses": '{"template":{"id":"t"},"recipients":[{"userId":"u1"},{"email":"a@example.com","phone":"+8613800000000"},'
    '{"wecomUserid":"zhangsan"},{"webhookUrl":"https://example.com/hook"},{"dingtalkRobot":"ops"},'
    '{"feishuRobot":"ops"},{"wecomRobot":"ops"}],"channels":["wechat.template","wechat.subscribe","wecom",'
    '"wecom.robot","dingtalk","feishu","email","webhook"],"priority":"PRIORITY_BULK"}',
    "invalid_channel": '{"template":{"id":"t"},"recipients":[{"email":"a@b"}],"channels":["fax"]}',
    "invalid_expiry": '{"template":{"id":"t"},"recipients":[{"email":"a@b"}],"sendAt":"2026-11-23T10:00:00Z",'
    '"expiresAt":"2026-11-23T09:00:00-01:00"}',
    "wrong_type": '{"recipients":[{"email": 5}]}',
    "unknown_enum": '{"priority":"PRIORITY_SOON"}',
    "unknown_field": '{"template":{"id":"t"},"sendAfter":"x"}',
}
for name, body in REQUESTS.items():
    write("request_json", name, body)


# --- request_proto: protobuf binary of the same requests ------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 1:
        return key + payload
    return key + varint(len(payload)) + payload


def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)


def value(v):  # google.protobuf.Value
    if v is None:
        return field(1, 0, 0)
    if isinstance(v, bool):
        return field(4, 0, int(v))
    if isinstance(v, (int, float)):
        return field(2, 1, struct.pack("<d", float(v)))
    if isinstance(v, str):
        return s(3, v)
    if isinstance(v, dict):
        return s(5, struct_(v))
    return s(6, b"".join(s(1, value(x)) for x in v))  # ListValue


def struct_(d):  # google.protobuf.Struct: map<string, Value> fields = 1
    return b"".join(s(1, s(1, k) + s(2, value(v))) for k, v in d.items())


def timestamp(seconds, nanos=0):
    return field(1, 0, seconds) + (field(2, 0, nanos) if nanos else b"")


def request(r):
    out = b""
    if "id" in r:
        out += s(1, r["id"])
    if "tenant" in r:
        out += s(2, r["tenant"])
    t = r.get("template")
    if t:
        out += s(3, s(1, t["id"]) + (field(2, 0, t["version"]) if t.get("version") else b"")
                 + (s(3, t["locale"]) if t.get("locale") else b""))
    if "variables" in r:
        out += s(4, struct_(r["variables"]))
    for rec in r.get("recipients", []):
        out += s(5, b"".join(s(n, rec[k]) for n, k in enumerate(
            ["userId", "wechatOpenid", "email", "phone", "wecomUserid", "webhookUrl",
             "dingtalkRobot", "feishuRobot", "wecomRobot"], 1) if k in rec))
    for c in r.get("channels", []):
        out += s(6, c)
    if "priority" in r:
        out += field(7, 0, r["priority"])
    if "sendAt" in r:
        out += s(8, timestamp(*r["sendAt"]))
    if "expiresAt" in r:
        out += s(9, timestamp(*r["expiresAt"]))
    if "idempotencyKey" in r:
        out += s(10, r["idempotencyKey"])
    for k, v in r.get("metadata", {}).items():
        out += s(11, s(1, k) + s(2, v))
    return out


full = dict(FULL, priority=2, sendAt=(1795428000,), expiresAt=(1795514400, 500))
write("request_proto", "full", request(full))
write("request_proto", "minimal", request({"template": {"id": "t"}, "recipients": [{"wechatOpenid": "o"}]}))
write("request_proto", "variables", request({
    "template": {"id": "order_shipped", "version": 3, "locale": "zh_CN"}, "tenant": "demo",
    "variables": {"n": 3, "f": 12.5, "b": True, "z": None, "l": [1, "x", {"k": "v"}], "o": {"a": {"b": "c"}}},
    "recipients": [{"userId": "u1"}, {"email": "a@b", "phone": "+86"}], "channels": ["email", "webhook"],
    "priority": 4}))
write("request_proto", "empty", b"")


# --- wechat_xml: plain (and decrypted) callback bodies --------------------------------------
def job_finish(status):
    return ("<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[oUser]]></FromUserName>"
            "<CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            "<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>3000000000000000001</MsgID>"
            f"<Status><![CDATA[{status}]]></Status></xml>")


vectors = json.load(open(os.path.join(ROOT, "tests", "vectors", "crypto.json")))
BODIES = {
    "job_finish_success": job_finish("success"),
    "job_finish_block": job_finish("failed:user block"),
    "sent_xml_one": "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser0000000001</FromUserName>"
    "<CreateTime>1620963428</CreateTime><MsgType>event</MsgType><Event>subscribe_msg_sent_event</Event>"
    "<SubscribeMsgSentEvent><List><TemplateId>T1</TemplateId><MsgID>1700827132819554304</MsgID>"
    "<ErrorCode>0</ErrorCode><ErrorStatus>success</ErrorStatus></List></SubscribeMsgSentEvent></xml>",
    "sent_xml_many": "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser0000000001</FromUserName>"
    "<CreateTime>1620963428</CreateTime><MsgType>event</MsgType><Event>subscribe_msg_sent_event</Event>"
    "<SubscribeMsgSentEvent><List><TemplateId>T1</TemplateId><MsgID>11</MsgID>"
    "<ErrorCode>0</ErrorCode><ErrorStatus>success</ErrorStatus></List>"
    "<List><TemplateId>T2</TemplateId><MsgID>12</MsgID><ErrorCode>43101</ErrorCode>"
    "<ErrorStatus>failed:user refuse</ErrorStatus></List></SubscribeMsgSentEvent></xml>",
    "sent_json_one": '{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1620963428,'
    '"MsgType":"event","Event":"subscribe_msg_sent_event",'
    '"SubscribeMsgSentEvent":{"List":{"TemplateId":"T1","MsgID":"1700827132819554304","ErrorCode":0,"ErrorStatus":"success"}}}',
    "sent_json_many": '{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1620963428,'
    '"MsgType":"event","Event":"subscribe_msg_sent_event",'
    '"SubscribeMsgSentEvent":{"List":[{"TemplateId":"T1","MsgID":11,"ErrorCode":0,"ErrorStatus":"success"},'
    '{"TemplateId":"T2","MsgID":12,"ErrorCode":43101,"ErrorStatus":"failed:user refuse"}]}}',
    "subscribe": "<xml><ToUserName>gh_1</ToUserName><FromUserName><![CDATA[oUser0000000001]]></FromUserName>"
    "<CreateTime>1700000001</CreateTime><MsgType>event</MsgType><Event><![CDATA[subscribe]]></Event>"
    "<EventKey><![CDATA[]]></EventKey></xml>",
    "popup_xml": "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser0000000001</FromUserName>"
    "<CreateTime>1610969440</CreateTime><MsgType>event</MsgType><Event>subscribe_msg_popup_event</Event>"
    "<SubscribeMsgPopupEvent><List><TemplateId>T1</TemplateId><SubscribeStatusString>accept</SubscribeStatusString>"
    "<PopupScene>2</PopupScene></List><List><TemplateId>T2</TemplateId>"
    "<SubscribeStatusString>reject</SubscribeStatusString><PopupScene>2</PopupScene></List>"
    "</SubscribeMsgPopupEvent></xml>",
    "change_json": '{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1610969440,'
    '"MsgType":"event","Event":"subscribe_msg_change_event","SubscribeMsgChangeEvent":{"List":'
    '{"TemplateId":"T1","SubscribeStatusString":"reject"}}}',
    "text_message": "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser</FromUserName>"
    "<CreateTime>1</CreateTime><MsgType>text</MsgType><Content>hi</Content><MsgId>1</MsgId></xml>",
    "dtd": '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x "boom">]><xml><MsgType>&x;</MsgType></xml>',
    "entity": "<xml><MsgType>&x;</MsgType></xml>",
    "envelope": "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><Encrypt><![CDATA[abc+/=]]></Encrypt></xml>",
    "wechat_safe_plaintext": vectors["wechat_safe_mode"][0]["plaintext"],
    "wecom_plaintext": vectors["wecom_callback"][0]["post"]["plaintext"],
}
for name, body in BODIES.items():
    write("wechat_xml", name, body)

# --- callback_decrypt: selector byte (account = byte % 3, mode = byte / 3 % 5) + input -----
WECHAT, WECOM = 0, 2
ENVELOPE, CIPHERTEXT, RAW, STRUCTURED, ROUND_TRIP = 0, 1, 2, 3, 4


def sel(account, mode):
    return bytes([mode * 3 + account])


for i, v in enumerate(vectors["wechat_safe_mode"]):
    WECHAT = i  # accounts 0 and 1 are the two safe-mode vectors' accounts
    env = f"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><Encrypt><![CDATA[{v['encrypt']}]]></Encrypt></xml>"
    write("callback_decrypt", f"wechat_envelope_xml_{i}", sel(WECHAT, ENVELOPE) + env.encode())
    write("callback_decrypt", f"wechat_envelope_json_{i}",
          sel(WECHAT, ENVELOPE) + json.dumps({"ToUserName": "gh_1", "Encrypt": v["encrypt"]}).encode())
    write("callback_decrypt", f"wechat_ciphertext_{i}", sel(WECHAT, CIPHERTEXT) + v["encrypt"].encode())
    if v.get("reply"):
        write("callback_decrypt", f"wechat_reply_ciphertext_{i}",
              sel(WECHAT, CIPHERTEXT) + v["reply"]["encrypt"].encode())
    plain = v["plaintext"].encode()
    body = v["random_prefix"].encode() + struct.pack(">I", len(plain)) + plain + v["appid"].encode()
    write("callback_decrypt", f"wechat_raw_plaintext_{i}", sel(WECHAT, RAW) + body)
    write("callback_decrypt", f"wechat_structured_{i}", sel(WECHAT, STRUCTURED) + v["random_prefix"].encode()
          + b"\x00" + struct.pack(">H", len(plain)) + plain + v["appid"].encode())
    write("callback_decrypt", f"wechat_round_trip_{i}", sel(WECHAT, ROUND_TRIP) + plain)
w = vectors["wecom_callback"][0]
env = (f"<xml><ToUserName><![CDATA[{w['corpid']}]]></ToUserName><Encrypt><![CDATA[{w['post']['encrypt']}]]>"
       "</Encrypt><AgentID><![CDATA[218]]></AgentID></xml>")
write("callback_decrypt", "wecom_envelope", sel(WECOM, ENVELOPE) + env.encode())
write("callback_decrypt", "wecom_echostr", sel(WECOM, CIPHERTEXT) + w["verify_url"]["echostr"].encode())
write("callback_decrypt", "wecom_echostr_spaces",
      sel(WECOM, CIPHERTEXT) + w["verify_url"]["echostr"].replace("+", " ").encode())
plain = w["post"]["plaintext"].encode()
write("callback_decrypt", "wecom_structured_bad_length", sel(WECOM, STRUCTURED) + b"0123456789abcdef"
      + b"\x01" + struct.pack(">I", 0xFFFFFFF0) + struct.pack(">H", len(plain)) + plain + w["corpid"].encode())
write("callback_decrypt", "wecom_structured_job_finish", sel(WECOM, STRUCTURED) + b"0123456789abcdef"
      + b"\x00" + struct.pack(">H", len(job_finish("success"))) + job_finish("success").encode() + w["corpid"].encode())
write("callback_decrypt", "wecom_raw_bad_padding", sel(WECOM, RAW) + bytes(range(32)) + b"\x21" * 32)
write("callback_decrypt", "wecom_round_trip_empty", sel(WECOM, ROUND_TRIP))
