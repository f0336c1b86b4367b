"""Identity: who calls capsa, proven by a token.

capsa's own identity service (``local`` mode) keeps projects, users and role assignments in the
store, checks passwords (argon2id) and issues signed tokens that expire; the API's ``/v3`` speaks
the part of Keystone v3 that clients use. In ``keystone`` mode an external Keystone does this
instead and capsa only asks it who a token belongs to (:mod:`capsa.identity.keystone`).
"""
