"""Login gate: when MISTUDIO_LOGIN_REQUIRED is on, every page but login needs a signed-in user.
And a guard that refuses URLs holding a NUL character before any view looks an id up."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse

OPEN_PREFIXES = ("/admin/login/", "/static/", "/accounts/login/")


class LoginRequiredWhenEnabled:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        anonymous = settings.LOGIN_REQUIRED and not request.user.is_authenticated
        if anonymous and not request.path.startswith(OPEN_PREFIXES):
            if request.path.startswith("/api/"):
                return JsonResponse({"detail": "Sign in first."}, status=401)
            return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
        return self.get_response(request)


class RefuseNulInUrl:
    """A NUL in the path or query (%00) can be no id, name or value of ours, and PostgreSQL
    refuses it in any query ("text fields cannot contain NUL"): answer 400, not a 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "\x00" in request.path or "%00" in request.META.get("QUERY_STRING", ""):
            return JsonResponse(
                {"detail": "The address holds a NUL character.", "code": "nul"}, status=400
            )
        return self.get_response(request)
