"""The floor: a bare Flask route that parses the same JSON body, served by the same gunicorn settings."""
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/webhook")
def webhook():
    body = request.get_json(force=True)
    return jsonify({"status": "accepted", "strategy": body.get("strategy_name")})


@app.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})
