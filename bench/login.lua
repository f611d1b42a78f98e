-- wrk script: POST /hub/login with a fixed anonymous XSRF token (valid for an hour).
local xsrf = os.getenv("XSRF")
local user = os.getenv("LOGIN_USER")
local pw = os.getenv("LOGIN_PASSWORD")
wrk.method = "POST"
wrk.path = "/hub/login?next="
wrk.body = "username=" .. user .. "&password=" .. pw .. "&_xsrf=" .. xsrf
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Cookie"] = "_xsrf=" .. xsrf
