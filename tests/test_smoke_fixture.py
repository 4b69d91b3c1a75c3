from conftest import CANARY, env_config


async def test_injects_key(mock_upstream, start_proxy, canary_env):
    url, state = mock_upstream
    proxy = await start_proxy(env_config(url))
    async with proxy.session.post(
        f"{proxy.url}/v1/predictions",
        json={"model": "truefusion-pro", "input": {"prompt": "x"}},
        headers={"X-User-Id": "alice", "Authorization": "Bearer sk-client", "X-Api-Key": "sk-client"},
    ) as r:
        assert r.status == 201, await r.text()
    seen = state.seen[-1]
    assert seen.headers["x-api-key"] == CANARY
    assert "Authorization" not in seen.headers


def test_keyring_roundtrip(secret_service):
    import keyring

    keyring.set_password("skyproxy", "dev", "sk-x-1")
    assert keyring.get_password("skyproxy", "dev") == "sk-x-1"
