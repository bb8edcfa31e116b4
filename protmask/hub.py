"""Pushing a trained model to the Hugging Face Hub, checked at the start of a run, not after it."""

from __future__ import annotations

import os


class HubTarget:
    """A hub repository that was reachable with a token when the run started."""

    def __init__(self, repo_id: str, token: str):
        self.repo_id, self.token = repo_id, token

    @classmethod
    def check(cls, repo_id: str, say) -> "HubTarget | None":
        """Say now, at the start, when the push cannot happen; the run still saves locally."""
        from huggingface_hub import get_token

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            say(f"push to hub: HF_HUB_OFFLINE is set, so {repo_id} will NOT be pushed; the model is saved locally.")
            return None
        token = get_token()
        if not token:
            say(f"push to hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN), so {repo_id} will NOT "
                "be pushed; the model is saved locally.")
            return None
        try:
            from huggingface_hub import HfApi

            user = HfApi(token=token).whoami()
        except Exception as error:  # network, DNS, expired token: all mean the same for this run
            say(f"push to hub: the Hub is not reachable or the token is refused ({type(error).__name__}: {error}); "
                f"{repo_id} will NOT be pushed; the model is saved locally.")
            return None
        say(f"push to hub: logged in as {user.get('name', '?')}; final/ goes to {repo_id} at the end.")
        return cls(repo_id, token)

    def push(self, folder, say) -> bool:
        from huggingface_hub import HfApi

        try:
            api = HfApi(token=self.token)
            api.create_repo(self.repo_id, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=self.repo_id, commit_message="protmask training run")
        except Exception as error:
            say(f"push to hub failed ({type(error).__name__}: {error}); the model is in {folder}")
            return False
        say(f"pushed {folder} to https://huggingface.co/{self.repo_id}")
        return True
